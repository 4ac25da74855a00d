"""auditor.ray_data in a user's own pipeline on a local Ray: read_parquet -> add_memorization_scores -> filter ->
write_parquet; scores equal Scorer.score, rows and user columns come through, bad rows get a status."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from audit_corpus import captions

from auditor import schema
from auditor.errors import ConfigError
from tests.scores_close import assert_scores_close

pytestmark = pytest.mark.integration


def write_user_corpus(folder) -> pa.Table:
    """Two parquet files of a user's table: its own `status` and `score` columns (names the audit uses inside)."""
    folder.mkdir()
    texts = captions("a user photo of a", 15)
    table = pa.table(
        {
            "id": pa.array(range(18), pa.int64()),
            "url": [f"https://x/{i}.jpg" for i in range(18)],
            "caption": [*texts[:7], None, "", "   ", *texts[7:]],
            "status": ["licensed" if i % 2 else "unknown" for i in range(18)],
            "score": pa.array([i / 10 for i in range(18)], pa.float64()),
        }
    )
    pq.write_table(table.slice(0, 9), folder / "part-0.parquet")
    pq.write_table(table.slice(9), folder / "part-1.parquet")
    return table


def test_user_pipeline_scores_flags_and_keeps_every_row_and_column(
    ray_local, tmp_path, micro_model_dir, micro_scorer
):
    import ray

    from auditor.ray_data import OUTPUT_COLUMNS, add_memorization_scores

    table = write_user_corpus(tmp_path / "in")
    texts = [c for c in table.column("caption").to_pylist() if c and c.strip()]
    reference = dict(zip(texts, micro_scorer.score(texts).tolist(), strict=True))
    threshold = float(np.median(list(reference.values())))

    ds = ray.data.read_parquet(str(tmp_path / "in"))
    marked = add_memorization_scores(
        ds,
        model=str(micro_model_dir),
        caption_column="caption",
        threshold=threshold,
        batch_size=4,
        dtype="fp32",
    ).materialize()
    marked.filter(expr=f"{schema.MEMORIZATION_FLAG} == False").write_parquet(str(tmp_path / "clean"))

    # 1. Every row once, every user column untouched (its own status and score too), the three added.
    result = pa.concat_tables(ray.get(marked.to_arrow_refs())).sort_by("id")
    assert result.column_names == [*table.column_names, *OUTPUT_COLUMNS]
    for name in table.column_names:
        assert result.column(name).to_pylist() == table.column(name).to_pylist(), name
    assert result.schema.field(schema.MEMORIZATION_SCORE).type == pa.float32()
    assert result.schema.field(schema.MEMORIZATION_FLAG).type == pa.bool_()
    rows = result.to_pylist()
    # 2. Bad rows: a status, no score, not flagged.
    by_id = {r["id"]: r for r in rows}
    assert by_id[7][schema.MEMORIZATION_STATUS] == schema.NULL_CAPTION
    assert by_id[8][schema.MEMORIZATION_STATUS] == schema.EMPTY_CAPTION
    assert by_id[9][schema.MEMORIZATION_STATUS] == schema.EMPTY_CAPTION
    bad = [r for r in rows if r[schema.MEMORIZATION_STATUS] != schema.OK]
    assert len(bad) == 3
    assert all(r[schema.MEMORIZATION_SCORE] is None and r[schema.MEMORIZATION_FLAG] is False for r in bad)
    # 3. Scores equal Scorer.score (as the audit's do); flagged is score > threshold.
    ok = [r for r in rows if r[schema.MEMORIZATION_STATUS] == schema.OK]
    assert_scores_close([r[schema.MEMORIZATION_SCORE] for r in ok], [reference[r["caption"]] for r in ok])
    assert all(r[schema.MEMORIZATION_FLAG] == (r[schema.MEMORIZATION_SCORE] > threshold) for r in ok)
    flagged_ids = {r["id"] for r in ok if r[schema.MEMORIZATION_FLAG]}
    assert 0 < len(flagged_ids) < len(ok)
    # 4. The filtered output: exactly the unflagged rows, with all their columns.
    clean = pads.dataset(str(tmp_path / "clean"), format="parquet").to_table().sort_by("id")
    assert clean.column("id").to_pylist() == sorted(set(range(18)) - flagged_ids)
    assert clean.column("url").to_pylist() == [by_id[i]["url"] for i in clean.column("id").to_pylist()]


def test_scores_equal_the_audit_of_the_same_captions(ray_local, tmp_path, micro_model_dir):
    """The same core as `auditor audit`: identical scores and statuses for identical captions, model and seed."""
    import ray

    from auditor.config import AuditConfig
    from auditor.pipeline.audit import run
    from auditor.ray_data import add_memorization_scores

    table = write_user_corpus(tmp_path / "in")
    assert run(AuditConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "audit"),
                           model=str(micro_model_dir), dtype="fp32", quiet=True, report=False,
                           generations=2, seed=3)).exit_code == 0  # fmt: skip
    audit = pads.dataset(str(tmp_path / "audit" / "scores"), format="parquet", partitioning="hive").to_table()
    audited = {(r["caption"], r[schema.STATUS]): r[schema.SCORE] for r in audit.to_pylist()}
    ds = add_memorization_scores(
        ray.data.from_arrow(table), model=str(micro_model_dir), caption_column="caption", dtype="fp32",
        generations=2, seed=3,
    )  # fmt: skip
    mine = {
        (r["caption"], r[schema.MEMORIZATION_STATUS]): r[schema.MEMORIZATION_SCORE] for r in ds.iter_rows()
    }
    assert mine.keys() == audited.keys()
    assert_scores_close(
        [mine[k] if mine[k] is not None else np.nan for k in audited],
        [audited[k] if audited[k] is not None else np.nan for k in audited],
    )


def test_bad_options_fail_before_anything_runs(ray_local, tmp_path, micro_model_dir):
    import ray

    from auditor.ray_data import add_memorization_scores

    ds = ray.data.from_items([{"text": "a cat", schema.MEMORIZATION_FLAG: True}])
    model = str(micro_model_dir)
    with pytest.raises(ConfigError, match=r"caption_column 'caption' is not a column .*columns are: text, "):
        add_memorization_scores(ds, model=model, caption_column="caption")
    with pytest.raises(ConfigError, match=r"already has column\(s\) memorization_flag.*drop or rename them"):
        add_memorization_scores(ds, model=model, caption_column="text")
    plain = ray.data.from_items([{"text": "a cat"}])
    with pytest.raises(ConfigError, match="pass threshold or threshold_file, not both"):
        add_memorization_scores(
            plain, model=model, caption_column="text", threshold=1.0, threshold_file="t.json"
        )
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1, got 0"):
        add_memorization_scores(plain, model=model, caption_column="text", batch_size=0)
    with pytest.raises(ConfigError, match="actors must be an int >= 1, got 0"):
        add_memorization_scores(plain, model=model, caption_column="text", actors=0)
    with pytest.raises(ConfigError, match=r"gpus_per_actor must be >= 0 .*got -1"):
        add_memorization_scores(plain, model=model, caption_column="text", gpus_per_actor=-1)
    with pytest.raises(ConfigError, match="cuda_graphs=True needs GPU actors"):
        add_memorization_scores(plain, model=model, caption_column="text", cuda_graphs=True, gpus_per_actor=0)
    (tmp_path / "t.json").write_text(json.dumps({"t": 1}))
    with pytest.raises(ConfigError, match="has threshold None"):
        add_memorization_scores(
            plain, model=model, caption_column="text", threshold_file=str(tmp_path / "t.json")
        )


def test_memorization_scorer_without_ray_takes_every_batch_format(micro_model_dir, micro_scorer):
    """The callable class alone (what a user wires into map_batches): pyarrow, pandas and numpy batches."""
    from auditor.ray_data import MemorizationScorer

    scorer = MemorizationScorer(
        model=str(micro_model_dir), caption_column="text", dtype="fp32", threshold=-1.0
    )
    reference = float(micro_scorer.score(["a photo of a cat"])[0])
    arrow = scorer(pa.table({"text": ["a photo of a cat", None], "status": ["x", "y"]}))
    assert arrow.column("status").to_pylist() == ["x", "y"]
    assert arrow.column(schema.MEMORIZATION_STATUS).to_pylist() == [schema.OK, schema.NULL_CAPTION]
    assert arrow.column(schema.MEMORIZATION_FLAG).to_pylist() == [True, False]
    assert_scores_close(arrow.column(schema.MEMORIZATION_SCORE)[0].as_py(), reference)
    frame = scorer(pd.DataFrame({"text": ["a photo of a cat", 7, None], "n": [1, 2, 3]}))
    assert list(frame[schema.MEMORIZATION_STATUS]) == [schema.OK, schema.NOT_STRING, schema.NULL_CAPTION]
    assert list(frame["n"]) == [1, 2, 3] and frame[schema.MEMORIZATION_SCORE].dtype == np.float32
    assert np.isnan(frame[schema.MEMORIZATION_SCORE].iloc[1])
    numpy = scorer({"text": np.array(["a photo of a cat", "  "], dtype=object)})
    assert list(numpy[schema.MEMORIZATION_STATUS]) == [schema.OK, schema.EMPTY_CAPTION]
    assert_scores_close(numpy[schema.MEMORIZATION_SCORE][0], reference)
    typed = scorer(pa.table({"text": pa.array([1, None], pa.int64())}))  # a caption column that is not text
    assert typed.column(schema.MEMORIZATION_STATUS).to_pylist() == [schema.NOT_STRING, schema.NULL_CAPTION]
    with pytest.raises(ConfigError, match="already has column"):
        scorer(pa.table({"text": ["a"], schema.MEMORIZATION_SCORE: [1.0]}))
