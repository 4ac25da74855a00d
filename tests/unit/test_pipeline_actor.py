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
from auditor.io.ledger import DONE, Ledger
from auditor.io.parquet import commit_unit, read_shard
from auditor.pipeline import plan as plan_mod
from auditor.pipeline.activity import ACTOR_READY, READ, SCORE
from auditor.pipeline.commit import UnitTracker
from auditor.pipeline.plan import plan_audit, resolve_threshold
from auditor.pipeline.stages import (
    DONE_UNITS,
    ScoreActor,
    read_and_tokenize,
    read_unit_rows,
    stage_and_acknowledge,
)
from auditor.pipeline.tokenize import CaptionTokenizer, tokenize_table
from tests.scores_close import assert_scores_close

CAPTIONS = ["a photo of a cat", "mona lisa by leonardo", "a photo of a cat", " ".join(["word"] * 100)]


class ActivityRecorder:
    """Stands for the ActivityLog actor's handle: `log.record.remote(stage, rows)` is what the workers call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.record = self
        self.remote = lambda stage, rows: self.calls.append((stage, rows))


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
    batch = pa.Table.from_pylist([{**vars(f), DONE_UNITS: []} for f in files])
    reads, scores_reported = ActivityRecorder(), ActivityRecorder()
    tables = list(read_and_tokenize(batch, cfg, activity=reads))
    assert reads.calls == [(READ, t.num_rows) for t in tables]  # every table read is news for the watchdog
    data = pa.concat_tables(t for t in tables if t.column(schema.STATUS)[0].as_py() != schema.END_OF_UNIT)
    out = ScoreActor(cfg, activity=scores_reported)(data)
    # Ready, then the batch's data rows, bad ones included (progress counts them).
    assert scores_reported.calls == [(ACTOR_READY, 0), (SCORE, 6)]
    assert schema.INPUT_IDS not in out.column_names
    status = out.column(schema.STATUS).to_pylist()
    assert status == ["ok"] * 4 + [schema.NULL_CAPTION, schema.EMPTY_CAPTION]
    scores = out.column(schema.SCORE).to_pylist()
    assert_scores_close(scores[:4], reference)
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
    assert_scores_close(again.column(schema.SCORE).to_pylist()[:4], reference)
    # Captions seen in an earlier batch of the same actor are not scored again, and score the same.
    assert fresh.cache_hits == 0  # a repeat within one batch is deduplicated by the Scorer itself
    third = fresh(data)
    assert fresh.cache_hits == 4
    assert third.column(schema.SCORE).to_pylist() == again.column(schema.SCORE).to_pylist()


def test_score_actor_bad_batch_gets_status(tmp_path, tiny_model_dir, parquet_input, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir, dtype="fp32")
    actor = ScoreActor(cfg)
    tokenized = tokenize_table(
        next(read_unit_rows(cfg, list_inputs(cfg.inputs, None, {})[0])), actor.tokenizer
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
        tokenize_table(next(read_unit_rows(cfg, list_inputs(cfg.inputs, None, {})[0])), actor.tokenizer)
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
    assert [item.file.relative for item in plan.pending] == ["a.parquet"]
    assert "not readable as parquet" in plan.unreadable[str(tmp_path / "in" / "bad.parquet")]
    mark_done(cfg, plan)
    again = plan_audit(cfg)
    assert again.pending == [] and [f.relative for f in again.skipped] == ["a.parquet"]
    for changed in ({"seed": 1}, {"unit_rows": 2}):  # another fingerprint or another unit cut: redone whole
        other = plan_audit(make_cfg(tmp_path, tiny_model_dir, **changed))
        assert [item.file.relative for item in other.pending] == ["a.parquet"]
        assert [f.relative for f in other.fresh] == ["a.parquet", "bad.parquet"]


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


def mark_done(cfg: AuditConfig, plan, units: int = 1, done: range | None = None) -> None:
    """Ledger records as a run leaves them: units `done` of a file cut into `units`."""
    file = plan.pending[0].file
    for unit in done if done is not None else range(units):
        Ledger(fsspec.filesystem("file"), cfg.output).mark(
            {"source": file.source, "shard": file.shard, "unit": unit, "file_units": units, "status": DONE,
             "identity": file.identity, "fingerprint": plan.fingerprint, "unit_rows": cfg.unit_rows}
        )  # fmt: skip


def test_units_commit_when_every_row_is_staged_and_a_broken_file_fails(
    tmp_path, tiny_model_dir, parquet_input
):
    pq.write_table(pq.read_table(parquet_input), parquet_input, row_group_size=2)  # 3 row groups
    cfg = make_cfg(tmp_path, tiny_model_dir, dtype="fp32", threshold=0.0, unit_rows=4)
    fs = fsspec.filesystem("file")
    file = list_inputs(cfg.inputs, None, {})[0]
    actor = ScoreActor(cfg)
    scored = [actor(tokenize_table(t, actor.tokenizer)) for t in read_unit_rows(cfg, file, batch_rows=1)]
    # units: rows 0-3 (row groups 0, 1) and rows 4-5 (row group 2); each ends with its END_OF_UNIT row.
    acks = [stage_and_acknowledge(t, cfg) for t in scored]
    assert sum(a.num_rows for a in acks) == 8 and all(a.nbytes < 1024 for a in acks)
    tracker = UnitTracker()
    # Out of order: unit 0's end arrives before its last rows; it is ready only when all are in.
    assert tracker.consume(acks[4]) == [] and tracker.consume(acks[0]) == []
    assert tracker.consume(pa.concat_tables(acks[1:3])) == []
    [unit0] = tracker.consume(acks[3])
    assert (unit0.unit, unit0.received, unit0.expected, unit0.file_units, unit0.first_row) == (0, 4, 4, 2, 0)
    assert unit0.counts["ok"] == 4 and unit0.counts["flagged"] == 4 and sum(unit0.histogram) == 4
    [unit1] = tracker.consume(pa.concat_tables(acks[5:]))
    assert (unit1.unit, unit1.received, unit1.first_row) == (1, 2, 4) and unit1.counts["null_caption"] == 1
    assert read_shard(fs, f"{cfg.output}/scores", file.shard, [schema.ROW]) is None  # staged only
    flagged_schema = schema.flagged_schema(False)
    # The node that scored the rows is counted in the acknowledgements and never written.
    assert schema.NODE in scored[0].column_names and unit0.nodes == {actor.node: 4}
    for state in (unit1, unit0):
        parts = commit_unit(fs, cfg.output, state.shard, state.unit, state.staged, flagged_schema)
        assert parts["rows"] == state.received
        assert pq.read_schema(parts["scores"]).names == schema.SCORES_SCHEMA.names
        if parts["flagged"]:
            assert pq.read_schema(parts["flagged"]).names == flagged_schema.names
    scores = read_shard(fs, f"{cfg.output}/scores", file.shard, [schema.ROW])
    assert scores.column(schema.ROW).to_pylist() == list(range(6))
    assert read_shard(fs, f"{cfg.output}/flagged", file.shard, [schema.ID]).num_rows == 4
    assert not list((tmp_path / "out" / "_staging").rglob("*.parquet"))
    # Resuming: done units are not read again.
    rest = list(read_unit_rows(cfg, file, done_units=frozenset({0})))
    assert pa.concat_tables(rest).column(schema.ROW).to_pylist() == [
        4,
        5,
        4,
    ]  # two rows + END_OF_UNIT (first row 4)
    # A file that breaks: its unit fails with the reader's error.
    (tmp_path / "in" / "b.parquet").write_bytes(b"garbage")
    broken = list_inputs((str(tmp_path / "in" / "b.parquet"),), None, {})[0]
    [failed] = UnitTracker().consume(
        stage_and_acknowledge(actor(tokenize_table(next(read_unit_rows(cfg, broken)), actor.tokenizer)), cfg)
    )
    assert failed.error and "b.parquet" in failed.error or "Parquet" in failed.error


def test_force_redoes_complete_files(tmp_path, tiny_model_dir, parquet_input):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    plan = plan_audit(cfg)
    mark_done(cfg, plan)
    assert plan_audit(cfg).pending == []
    forced = plan_audit(make_cfg(tmp_path, tiny_model_dir, force=True))
    assert [item.file.relative for item in forced.pending] == ["a.parquet"] and forced.fresh


def test_partly_committed_file_resumes_its_other_units(tmp_path, tiny_model_dir, parquet_input):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    plan = plan_audit(cfg)
    mark_done(cfg, plan, units=3, done=range(0, 2))
    [item] = plan_audit(cfg).pending
    assert item.done_units == frozenset({0, 1})
    assert plan_audit(cfg).fresh == []  # its committed units stay
    pq.write_table(pa.table({"caption": ["x"] * 7}), parquet_input)
    changed = plan_audit(cfg)
    assert changed.pending[0].done_units == frozenset() and changed.fresh


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


# What a file without the caption column says, by format: jsonl fails as csv and parquet do (it used to give every
# row null_caption and exit 0 while the same file as csv failed).
MISSING_CAPTION = {
    "parquet": "has no column 'caption'; columns are: TEXT, url. Rename the column in this file, or leave",
    "csv": "has no column 'caption'; columns are: TEXT, url. Rename the column in this file, or leave",
    "jsonl": "f01.jsonl: no record has the key 'caption' (keys are read from the first 4096 records of a JSON-lines "
    "file, as from a csv header); keys are: TEXT, url. Give its records that key",
}


@pytest.mark.parametrize("fmt", sorted(MISSING_CAPTION))
def test_columns_are_checked_on_a_sample_and_other_files_fail_alone(tmp_path, tiny_model_dir, fmt):
    (tmp_path / "in").mkdir()
    for i in range(20):
        if i == 1:  # file 1 lies outside the sample of 8 spread over 20
            path = tmp_path / "in" / f"f01.{fmt}"
            if fmt == "parquet":
                pq.write_table(pa.table({"TEXT": ["a cat 1"], "url": ["u"]}), path)
            elif fmt == "csv":
                path.write_text("TEXT,url\na cat 1,u\n")
            else:
                path.write_text(json.dumps({"TEXT": "a cat 1"}) + "\n" + json.dumps({"url": "u"}) + "\n")
        else:
            pq.write_table(pa.table({"caption": [f"a cat {i}"]}), tmp_path / "in" / f"f{i:02d}.parquet")
    cfg = make_cfg(tmp_path, tiny_model_dir)
    plan = plan_audit(cfg)
    assert plan.unreadable == {} and len(plan.pending) == 20
    lacking = next(item.file for item in plan.pending if item.file.relative == f"f01.{fmt}")
    [control] = list(read_unit_rows(cfg, lacking))
    assert control.column(schema.STATUS).to_pylist() == [schema.READ_ERROR]
    assert MISSING_CAPTION[fmt] in control.column(schema.ERROR)[0].as_py()
    # In the sample, the same file is caught before Ray starts, with the same message.
    for i in range(2, 20):
        (tmp_path / "in" / f"f{i:02d}.parquet").unlink()
    assert MISSING_CAPTION[fmt] in plan_audit(cfg).unreadable[lacking.source]


def test_options_added_later_keep_the_fingerprint_of_audits_from_before_them(tmp_path):
    """An output audited before --score-sigma existed is not re-audited after an upgrade: unset, it stays out of the
    fingerprint; set, it changes it."""
    import hashlib

    cfg = AuditConfig(inputs=("in/",), output=str(tmp_path / "out"), model="m", threshold=1.5)
    threshold = resolve_threshold(cfg)
    # The payload as run_fingerprint built it before --score-sigma (and --compression, unset here) existed.
    before = ("caption_column", "id_column", "keep_columns", "format", "generations", "steps", "seed", "dtype",
              "explain_flagged")  # fmt: skip
    payload = {name: getattr(cfg, name) for name in before} | {"model": "f" * 64, "threshold": 1.5}
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()
    assert plan_mod.run_fingerprint(cfg, "f" * 64, threshold) == old
    at_sigma = AuditConfig(
        inputs=("in/",), output=str(tmp_path / "out"), model="m", threshold=1.5, score_sigma=0.94
    )
    assert plan_mod.run_fingerprint(at_sigma, "f" * 64, threshold) != old
