"""The pipeline's steps without Ray: plan checks, CPU tokenization, `ScoreActor(cfg)(batch)`, the driver sink."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from auditor import schema
from auditor.config import AuditConfig
from auditor.errors import ConfigError
from auditor.io.inputs import list_inputs
from auditor.io.ledger import DONE, FAILED, Ledger
from auditor.io.parquet import read_shard
from auditor.pipeline import plan as plan_mod
from auditor.pipeline.plan import plan_audit, resolve_threshold
from auditor.pipeline.sink import AuditSink
from auditor.pipeline.stages import ScoreActor, read_and_tokenize, read_file_rows
from auditor.pipeline.tokenize import CaptionTokenizer, tokenize_table

CAPTIONS = ["a photo of a cat", "mona lisa by leonardo", "a photo of a cat", " ".join(["word"] * 100)]


def make_cfg(tmp_path, model, **changes) -> AuditConfig:
    return AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(model), **changes
    )


@pytest.fixture
def parquet_input(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"caption": [*CAPTIONS, None, "   "], "url": list("abcdef")}), tmp_path / "in" / "a.parquet"
    )
    return tmp_path / "in" / "a.parquet"


def test_caption_tokenizer_matches_scorer(tiny_scorer, tiny_model_dir):
    mine = CaptionTokenizer.from_model(str(tiny_model_dir)).tokenize(CAPTIONS)
    theirs = tiny_scorer.tokenize(CAPTIONS)
    for name in ("input_ids", "attention_mask", "n_tokens", "truncated"):
        np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name))
    assert theirs.truncated[-1]


def test_score_actor_without_ray(tmp_path, tiny_model_dir, tiny_scorer, parquet_input):
    reference = tiny_scorer.score(CAPTIONS)
    threshold = float(np.median(reference))
    cfg = make_cfg(tmp_path, tiny_model_dir, threshold=threshold, keep_columns=("url",), dtype="fp32")
    files = list_inputs(cfg.inputs, None, {})
    batch = pa.Table.from_pylist([vars(f) for f in files])
    tables = list(read_and_tokenize(batch, cfg))
    data = pa.concat_tables(t for t in tables if t.column(schema.STATUS)[0].as_py() != schema.END_OF_FILE)
    out = ScoreActor(cfg)(data)
    assert schema.INPUT_IDS not in out.column_names
    status = out.column(schema.STATUS).to_pylist()
    assert status == ["ok"] * 4 + [schema.NULL_CAPTION, schema.EMPTY_CAPTION]
    scores = out.column(schema.SCORE).to_pylist()
    np.testing.assert_allclose(scores[:4], reference, rtol=1e-5)
    assert scores[4:] == [None, None]
    assert out.column(schema.FLAGGED).to_pylist() == [s is not None and s > threshold for s in scores]
    assert out.column(schema.N_TOKENS).to_pylist()[4:] == [None, None]
    assert out.column("url").to_pylist() == list("abcdef")
    runtime = json.loads(out.schema.metadata[schema.ACTOR_RUNTIME_KEY])
    assert (
        runtime["shared_prefix"] is True and runtime["dtype"] == "float32" and runtime["torch_threads"] >= 1
    )
    # A batch with nothing to score says nothing of the runtime: it may not be settled yet.
    unscorable = ScoreActor(cfg)(data.slice(4))
    assert unscorable.schema.metadata is None
    # Without the CPU stage's token columns the actor tokenizes itself.
    fresh = ScoreActor(cfg)
    again = fresh(data.drop_columns([schema.INPUT_IDS, schema.ATTENTION_MASK]))
    np.testing.assert_allclose(again.column(schema.SCORE).to_pylist()[:4], reference, rtol=1e-5)
    # Captions seen in an earlier batch of the same actor are not scored again, and score the same.
    assert fresh.cache_hits == 0  # a repeat within one batch is deduplicated by the Scorer itself
    third = fresh(data)
    assert fresh.cache_hits == 4
    assert third.column(schema.SCORE).to_pylist() == again.column(schema.SCORE).to_pylist()


def test_score_actor_bad_batch_gets_status(tmp_path, tiny_model_dir, parquet_input, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir, dtype="fp32")
    actor = ScoreActor(cfg)
    tokenized = tokenize_table(
        next(read_file_rows(cfg, list_inputs(cfg.inputs, None, {})[0])), actor.tokenizer
    )

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(actor.scorer, "score_tokenized", boom)
    out = actor(tokenized)
    assert out.column(schema.STATUS).to_pylist()[:4] == [schema.SCORE_ERROR] * 4
    assert "CUDA out of memory" in out.column(schema.ERROR)[0].as_py()
    assert out.column(schema.FLAGGED).to_pylist() == [False] * 6
    assert out.schema.metadata is None  # a batch the scorer failed on reports no runtime


def test_explain_flagged_adds_token_columns(tmp_path, tiny_model_dir, parquet_input):
    cfg = make_cfg(tmp_path, tiny_model_dir, threshold=-1.0, explain_flagged=True, dtype="fp32")
    actor = ScoreActor(cfg)
    out = actor(
        tokenize_table(next(read_file_rows(cfg, list_inputs(cfg.inputs, None, {})[0])), actor.tokenizer)
    )
    tokens = out.column(schema.TOKENS).to_pylist()
    significance = out.column(schema.TOKEN_SIGNIFICANCE).to_pylist()
    assert tokens[0] and len(tokens[0]) == len(significance[0])
    assert tokens[4] is None and significance[5] is None  # not flagged (no score)


def test_explain_unavailable_is_a_config_error(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(plan_mod.importlib, "import_module", missing)
    with pytest.raises(ConfigError, match="explain is not available"):
        plan_mod.load_explain()


def test_plan_missing_caption_column_lists_columns(tmp_path, tiny_model_dir):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"TEXT": ["a"], "url": ["u"]}), tmp_path / "in" / "a.parquet")
    with pytest.raises(
        ConfigError, match=r"'caption' not found in .*a\.parquet; columns are: TEXT, url\. Pass "
    ):
        plan_audit(make_cfg(tmp_path, tiny_model_dir))


def test_plan_records_corrupt_file_and_skips_done(tmp_path, tiny_model_dir, parquet_input):
    (tmp_path / "in" / "bad.parquet").write_bytes(b"garbage")
    cfg = make_cfg(tmp_path, tiny_model_dir)
    plan = plan_audit(cfg)
    assert [f.relative for f in plan.pending] == ["a.parquet"]
    assert "not readable as parquet" in plan.unreadable[str(tmp_path / "in" / "bad.parquet")]
    Ledger(fsspec.filesystem("file"), cfg.output).mark(
        {
            "source": str(parquet_input),
            "shard": plan.pending[0].shard,
            "status": DONE,
            "fingerprint": plan.fingerprint,
        }
    )
    again = plan_audit(cfg)
    assert again.pending == [] and [f.relative for f in again.skipped] == ["a.parquet"]
    assert [f.relative for f in plan_audit(make_cfg(tmp_path, tiny_model_dir, seed=1)).pending] == [
        "a.parquet"
    ]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot be read"),
        ('{"t": 1}', "has threshold None"),
        ('{"threshold": "high"}', "'high'"),
    ],
)
def test_threshold_file_errors(tmp_path, content, match):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        resolve_threshold(AuditConfig(inputs=("i",), output="o", model="m", threshold_file=str(path)))


def test_threshold_origins(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"threshold": 2.5, "fpr": 0.01}))
    chosen = resolve_threshold(AuditConfig(inputs=("i",), output="o", model="m", threshold_file=str(path)))
    assert chosen.value == 2.5 and chosen.origin["content"] == {"threshold": 2.5, "fpr": 0.01}
    assert resolve_threshold(AuditConfig(inputs=("i",), output="o", model="m")).origin == {"kind": "none"}


def test_sink_commits_complete_files_and_fails_broken_ones(tmp_path, tiny_model_dir, parquet_input):
    cfg = make_cfg(tmp_path, tiny_model_dir, dtype="fp32", threshold=0.0)
    fs = fsspec.filesystem("file")
    files = list_inputs(cfg.inputs, None, {})
    ledger = Ledger(fs, cfg.output)
    sink = AuditSink(fs, cfg.output, ledger, files, "fp", explain=False)
    actor = ScoreActor(cfg)
    tables = [actor(tokenize_table(t, actor.tokenizer)) for t in read_file_rows(cfg, files[0], batch_rows=4)]
    # Out of order: the end-of-file row arrives before the last data rows; the file commits only when all are in.
    sink.consume(tables[2])
    sink.consume(tables[0])
    assert ledger.entries() == {}
    sink.consume(tables[1])
    record = ledger.entries()[files[0].source]
    assert record["status"] == DONE and record["rows"] == 6 and record["counts"]["ok"] == 4
    scores = read_shard(fs, f"{cfg.output}/scores", files[0].shard, [schema.ROW])
    assert sorted(scores.column(schema.ROW).to_pylist()) == list(range(6))
    assert read_shard(fs, f"{cfg.output}/flagged", files[0].shard, [schema.ID]).num_rows == 4
    # A file that breaks after some rows: its partial output is dropped and the ledger says failed.
    (tmp_path / "in" / "b.parquet").write_bytes(b"garbage")
    broken = list_inputs((str(tmp_path / "in" / "b.parquet"),), None, {})
    sink = AuditSink(fs, cfg.output, ledger, broken, "fp", explain=False)
    for t in read_file_rows(cfg, broken[0]):
        sink.consume(actor(tokenize_table(t, actor.tokenizer)))
    assert ledger.entries()[broken[0].source]["status"] == FAILED
    assert read_shard(fs, f"{cfg.output}/scores", broken[0].shard, [schema.ROW]) is None


def test_force_redoes_complete_files(tmp_path, tiny_model_dir, parquet_input):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    plan = plan_audit(cfg)
    Ledger(fsspec.filesystem("file"), cfg.output).mark(
        {
            "source": str(parquet_input),
            "shard": plan.pending[0].shard,
            "status": DONE,
            "fingerprint": plan.fingerprint,
        }
    )
    assert plan_audit(cfg).pending == []
    assert [f.relative for f in plan_audit(make_cfg(tmp_path, tiny_model_dir, force=True)).pending] == [
        "a.parquet"
    ]


def test_plan_column_errors(tmp_path, tiny_model_dir, parquet_input):
    with pytest.raises(
        ConfigError, match=r"--id-column/--keep-columns 'nope' not found in .*columns are: caption, url"
    ):
        plan_audit(make_cfg(tmp_path, tiny_model_dir, keep_columns=("nope",)))
    (tmp_path / "in" / "b.txt").write_text("a cat\n")
    with pytest.raises(ConfigError, match=r"b\.txt is a txt file .*drop those options"):
        plan_audit(make_cfg(tmp_path, tiny_model_dir, id_column="url"))


def test_unknown_uri_scheme_is_a_config_error():
    from auditor.io.storage import filesystem_for

    with pytest.raises(ConfigError, match=r"cannot open 'nosuchproto://b/x'.*Check the URI scheme"):
        filesystem_for("nosuchproto://b/x")
