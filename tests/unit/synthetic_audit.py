"""A small audit output written with pyarrow in the layout `auditor audit` writes (no Ray, no model).

OUTPUT/scores/shard=<key>/part-u<unit>.parquet, OUTPUT/flagged/shard=<key>/part-u<unit>.parquet, OUTPUT/_audit.json.
Scores are drawn from a seeded lognormal; the captions in MEMORIZED get high scores and sit mostly in shard 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from auditor import histogram, schema

SCRIPT_CAPTION = "<script>alert(1)</script>"
# (caption, score, copies): the top one is what a reader should see first; the script caption is flagged too.
MEMORIZED = (
    ("the zorblat tower at dusk, oil painting by Quenby", 4.25, 3),
    (SCRIPT_CAPTION, 3.5, 1),
    ("portrait of a fox in a red scarf & boots", 2.75, 2),
)
TOP_CAPTION = MEMORIZED[0][0]
SHARDS = ("part-00000-aaaaaaaaaa", "part-00001-bbbbbbbbbb", "part-00002-cccccccccc")


def _tokens(caption: str) -> tuple[list[str], list[float]]:
    words = caption.split()
    tokens = [f"{w}</w>" for w in words]
    significance = [0.1 + 0.05 * i for i in range(len(words))]
    significance[0] = 1.0  # the first word is the "trigger"
    return tokens, significance


def write_audit_output(
    root: Path,
    *,
    threshold: float | None = 1.0,
    rows_per_shard: int = 120,
    seed: int = 0,
    score_scale: float = 1.0,
    explain: bool = True,
    failed_units: list[dict] | None = None,
    with_histogram: bool = True,
    with_token_histogram: bool = False,
    calibration: bool = True,
    memorized: tuple = MEMORIZED,
    shards: tuple[str, ...] = SHARDS,
) -> Path:
    """Write the output and return `root`. score_scale multiplies every ordinary score (to make a second audit)."""
    rng = np.random.default_rng(seed)
    all_scores: list[np.ndarray] = []
    token_rows, token_flagged = np.zeros(78, np.int64), np.zeros(78, np.int64)
    counts = {"rows": 0, "flagged": 0}
    for index, shard in enumerate(shards):
        source = f"/data/corpus/{shard.rsplit('-', 1)[0]}.parquet"
        n = rows_per_shard
        captions: list[str | None] = [f"a {w} cat number {i} on a sofa" for i, w in enumerate(["grey"] * n)]
        # Ordinary scores are fixed by (seed, shard, row) only, so two audits with one seed share them.
        scores = (np.random.default_rng([seed, index]).lognormal(-1.2, 0.35, n) * score_scale).astype(
            np.float32
        )
        n_tokens = rng.integers(6, 30, n).astype(np.int32)
        status = [schema.OK] * n
        error: list[str | None] = [None] * n
        row = 0
        if index == 0:
            for caption, score, copies in memorized:
                for _ in range(copies):
                    captions[row], scores[row], n_tokens[row] = caption, score, len(caption.split())
                    row += 1
        # One bad row per shard: no caption, no score.
        captions[n - 1], status[n - 1], error[n - 1] = None, schema.NULL_CAPTION, "caption is null"
        score_array = pa.array(scores, pa.float32(), mask=np.array([s != schema.OK for s in status]))
        flagged = np.array(
            [
                threshold is not None and s == schema.OK and float(v) > threshold
                for s, v in zip(status, scores, strict=True)
            ]
        )
        table = pa.table(
            {
                # Ids name the input file and row, not the shard key, so outputs with other keys still join.
                schema.ID: [f"file{index}:{i}" for i in range(n)],
                schema.CAPTION: captions,
                schema.SCORE: score_array,
                schema.CONFIRM_SCORE: pa.nulls(n, pa.float32()),
                schema.FLAGGED: flagged,
                schema.SOURCE: [source] * n,
                schema.ROW: np.arange(n, dtype=np.int64),
                schema.N_TOKENS: pa.array(
                    n_tokens, pa.int32(), mask=np.array([s != schema.OK for s in status])
                ),
                schema.TRUNCATED: [False] * n,
                schema.STATUS: status,
                schema.ERROR: error,
            },
            schema=schema.SCORES_SCHEMA,
        )
        scores_dir = root / "scores" / f"shard={shard}"
        scores_dir.mkdir(parents=True, exist_ok=True)
        # Two units per shard: a report must read every part file of a shard.
        half = n // 2
        pq.write_table(table.slice(0, half), scores_dir / "part-u000000.parquet")
        pq.write_table(table.slice(half), scores_dir / "part-u000001.parquet")
        flagged_rows = table.filter(pa.array(flagged)).select(list(schema.FLAGGED_COLUMNS))
        if explain and flagged_rows.num_rows:
            pairs = [_tokens(c) for c in flagged_rows.column(schema.CAPTION).to_pylist()]
            flagged_rows = flagged_rows.append_column(
                schema.EXPLAIN_FIELDS[0], pa.array([p[0] for p in pairs], pa.list_(pa.string()))
            ).append_column(schema.EXPLAIN_FIELDS[1], pa.array([p[1] for p in pairs], pa.list_(pa.float32())))
        if flagged_rows.num_rows:
            flagged_dir = root / "flagged" / f"shard={shard}"
            flagged_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(flagged_rows, flagged_dir / "part-u000000.parquet")
        all_scores.append(scores[np.array(status) == schema.OK])
        ok = np.array(status) == schema.OK
        np.add.at(token_rows, n_tokens[ok], 1)
        np.add.at(token_flagged, n_tokens[ok & flagged], 1)
        counts["rows"] += n
        counts["flagged"] += int(flagged.sum())
        counts[schema.OK] = counts.get(schema.OK, 0) + n - 1
        counts[schema.NULL_CAPTION] = counts.get(schema.NULL_CAPTION, 0) + 1
    # A hidden leftover of a killed commit: readers must skip it.
    (root / "scores" / f"shard={shards[0]}" / "_tmp-part-u000002.parquet").write_bytes(b"not parquet")

    reference = np.random.default_rng([seed, 99]).lognormal(-1.2, 0.3, 300)
    if threshold is None:
        origin: dict = {"kind": "none"}
    elif calibration:
        content = {
            "threshold": threshold,
            "fpr": 0.01,
            "method": "calibrate",
            "n_reference": 300,
            "reference": "reference_clean.txt",
            "reference_fpr": float((reference > threshold).mean()),
            "reference_score_quantiles": {"0.5": 0.3, "0.9": 0.45, "0.99": 0.6},
            "reference_score_histogram": {"counts": histogram.count_scores(reference)},
            "model_fingerprint": "f" * 64,
        }
        origin = {"kind": "file", "path": "runs/threshold.json", "content": content}
    else:
        origin = {"kind": "flag", "value": threshold}
    summary = {
        "auditor_version": "0.1.0",
        "started_at": "2026-11-30T08:00:00+00:00",
        "finished_at": "2026-11-30T08:01:00+00:00",
        "config": {"inputs": ["/data/corpus"], "output": str(root), "model": "/models/toy", "batch_size": 32},
        "model_fingerprint": "f" * 64,
        "run_fingerprint": "r" * 64,
        "threshold": threshold,
        "threshold_origin": origin,
        "files": {
            "inputs": 3,
            "audited_this_run": 3,
            "skipped_complete": 0,
            "failed": [],
            "complete_in_output": 3,
        },
        "counts": {"this_run": counts, "output_total": counts},
        "runtime": {
            "actor_device": "cpu",
            "dtype": "fp32",
            "cuda_graphs": False,
            "actors": [{"device": "cpu", "dtype": "float32", "shared_prefix": True, "host": "node-1"}],
        },
        "timings_s": {"plan": 0.5, "pipeline": 12.25, "driver_write": 0.75},
        "versions": {"auditor": "0.1.0", "pyarrow": pa.__version__},
        "argv": ["auditor", "audit", "/data/corpus", str(root)],
    }
    if with_histogram:
        summary["score_histogram"] = {"counts": histogram.count_scores(np.concatenate(all_scores))}
    if with_token_histogram:
        summary["token_histogram"] = {"rows": token_rows.tolist(), "flagged": token_flagged.tolist()}
    if failed_units:
        summary["units"] = {"total": 7, "done": 7 - len(failed_units), "failed": failed_units}
    (root / "_audit.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return root
