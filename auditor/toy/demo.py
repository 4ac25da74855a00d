"""`make demo`: the shipped toy model, a sample corpus, a calibrated threshold, an audit, and its HTML report.

python -m auditor.toy.demo --out runs/demo
The model is the one shipped in the package (`auditor.toy.shipped`: `auditor toy-model build --preset full --seed 0`,
built once), so nothing trains; --model-dir DIR, or another --preset/--seed, builds (or reuses) a toy there instead.
The audit goes through `auditor.pipeline.audit.run(AuditConfig)` (local Ray) when the pipeline is installed, exactly as
`auditor audit INPUT OUTPUT --model M --threshold-file F`; otherwise it scores locally with the Scorer and writes
the same OUTPUT/scores + OUTPUT/flagged + OUTPUT/_audit.json layout. It ends with OUTPUT/report.html
(`auditor report`). This is a CLI entrypoint: it prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger("auditor.toy.demo")

CORPUS_FILES = 3  # parquet, parquet, jsonl: the reader must handle several files and formats


def write_corpus(out_dir: Path, manifest, *, rows: int, seed: int) -> tuple[list[Path], int]:
    """Write a caption corpus of about `rows` rows to out_dir/corpus/: every memorized caption 1-4 times (web
    data duplicates what gets memorized), plus ordinary captions of the same template (seen-once training captions
    and new ones). Returns the files and the number of memorized rows. Held-out captions are kept out: they are
    the calibration reference."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from auditor.toy.data import FILLERS, SLOTS, caption_from_attributes

    rng = np.random.default_rng([seed, 11])
    memorized_rows = [c for c in manifest.memorized for _ in range(int(rng.integers(1, 5)))]
    exclude = set(manifest.held_out) | set(manifest.memorized)
    ordinary = list(manifest.seen_once)
    seen = set(ordinary)
    while len(ordinary) + len(memorized_rows) < rows:
        attributes = np.array([rng.integers(len(values)) for values in SLOTS])
        caption = caption_from_attributes(attributes, FILLERS[int(rng.integers(len(FILLERS)))])
        if caption not in exclude and caption not in seen:
            seen.add(caption)
            ordinary.append(caption)
    captions = memorized_rows + ordinary
    order = rng.permutation(len(captions))
    captions = [captions[i] for i in order]
    corpus = out_dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    files = []
    for index, chunk in enumerate(np.array_split(np.arange(len(captions)), CORPUS_FILES)):
        table = pa.table(
            {"key": [f"{index:02d}-{i:06d}" for i in chunk], "caption": [captions[i] for i in chunk]}
        )
        if index < CORPUS_FILES - 1:
            path = corpus / f"part-{index:05d}.parquet"
            pq.write_table(table, path)
        else:
            path = corpus / f"part-{index:05d}.jsonl"
            with path.open("w", encoding="utf-8") as handle:
                for row in table.to_pylist():
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        files.append(path)
    return files, len(memorized_rows)


def pipeline_available() -> bool:
    try:
        from auditor.pipeline import audit
    except ImportError:
        return False
    return callable(getattr(audit, "run", None))


def run_pipeline_audit(corpus: Path, output: Path, model_dir: Path, threshold_file: Path) -> None:
    """The real path: `auditor audit CORPUS OUTPUT --model M --threshold-file F --id-column key` on a local Ray."""
    from auditor.config import AuditConfig
    from auditor.pipeline.audit import run

    config = AuditConfig.from_argv(
        [str(corpus), str(output), "--model", str(model_dir), "--threshold-file", str(threshold_file)]
        + ["--id-column", "key", "--force"]
    )
    result = run(config)
    if result.failed:
        raise RuntimeError(f"the audit failed on {sorted(result.failed)}: {result.failed}")


def run_local_audit(
    files: Sequence[Path], output: Path, model_dir: Path, record: dict, threshold_file: Path
) -> None:
    """Fallback while the Ray pipeline is not installed: score every file with one Scorer and write the audit layout
    (OUTPUT/scores/shard=<key>/, OUTPUT/flagged/shard=<key>/, a minimal OUTPUT/_audit.json) the report reads."""
    import shutil

    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from auditor import __version__, histogram, schema
    from auditor.io.inputs import shard_key
    from auditor.scoring import Scorer

    started = time.perf_counter()
    threshold = float(record["threshold"])
    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32")
    for folder in ("scores", "flagged"):
        shutil.rmtree(output / folder, ignore_errors=True)
    counts = {"rows": 0, "ok": 0, "flagged": 0}
    histograms = []
    for path in files:
        table = pq.read_table(path) if path.suffix == ".parquet" else pj.read_json(path)
        captions = table.column("caption").to_pylist()
        step = time.perf_counter()
        tokens = scorer.tokenize(captions)
        scores = scorer.score_tokenized(tokens)
        logger.info("scored %s: %d captions in %.1fs", path.name, len(captions), time.perf_counter() - step)
        flagged = scores > threshold
        source = str(path.resolve())
        out = pa.table(
            {
                schema.ID: table.column("key").to_pylist(),
                schema.CAPTION: captions,
                schema.SCORE: scores.astype(np.float32),
                schema.CONFIRM_SCORE: pa.nulls(len(captions), pa.float32()),  # one stage here
                schema.FLAGGED: flagged,
                schema.SOURCE: [source] * len(captions),
                schema.ROW: np.arange(len(captions), dtype=np.int64),
                schema.N_TOKENS: tokens.n_tokens,
                schema.TRUNCATED: tokens.truncated,
                schema.STATUS: [schema.OK] * len(captions),
                schema.ERROR: pa.nulls(len(captions), pa.string()),
            },
            schema=schema.SCORES_SCHEMA,
        )
        shard = f"{schema.SHARD}={shard_key(source)}"
        for folder, rows in (
            ("scores", out),
            ("flagged", out.filter(pa.array(flagged)).select(list(schema.FLAGGED_COLUMNS))),
        ):
            (output / folder / shard).mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, output / folder / shard / "part-u000000.parquet")
        counts["rows"] += len(captions)
        counts["ok"] += len(captions)
        counts["flagged"] += int(flagged.sum())
        histograms.append(histogram.count_scores(scores))
    summary = {
        "auditor_version": __version__,
        "config": {"inputs": [str(p) for p in files], "output": str(output), "model": str(model_dir)},
        "model_fingerprint": scorer.fingerprint,
        "model_family": scorer.family_name,
        "threshold": threshold,
        "threshold_origin": {"kind": "file", "path": str(threshold_file), "content": record},
        "files": {"inputs": len(files), "audited_this_run": len(files), "failed": []},
        "counts": {"this_run": counts, "output_total": counts},
        "score_histogram": {"counts": histogram.merge_counts(histograms)},
        "runtime": {"local_scorer": True, **scorer.runtime},
        "timings_s": {"local_scoring": round(time.perf_counter() - started, 3)},
    }
    (output / "_audit.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def resolve_model(model_dir: str | None, preset: str, seed: int) -> tuple[Path, dict, str]:
    """(folder, build record, what was done): the shipped model for the shipped preset and seed, else a toy built
    (or reused) in `model_dir` (default .cache/toy-model-<preset>-seed<seed>). Training logs its progress."""
    from auditor.toy.shipped import SHIPPED_PRESET, SHIPPED_SEED, shipped_model_dir
    from auditor.toy.train import build_settings, build_toy_model, read_build_info, resolve_preset

    if model_dir is None and (preset, seed) == (SHIPPED_PRESET, SHIPPED_SEED):
        shipped = shipped_model_dir()
        return shipped, read_build_info(shipped) or {}, "shipped with the package, no training"
    folder = Path(model_dir or f".cache/toy-model-{preset}-seed{seed}")
    # The demo owns its model folder: a toy build of an older recipe (or other preset/seed) there is rebuilt.
    cached = read_build_info(folder)
    stale = cached is not None and cached.get("settings") != build_settings(resolve_preset(preset), seed)
    built, info = build_toy_model(folder, preset, seed=seed, force=stale)
    return built, info, "reused" if cached is not None and not stale else "trained now"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m auditor.toy.demo", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="build (or reuse) a toy model in this folder instead of using the shipped one (trains: ~9 min)",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder of the demo")
    parser.add_argument(
        "--preset", default="full", choices=["full", "test"], help="toy model preset (default full, shipped)"
    )
    parser.add_argument("--seed", type=int, default=0, help="toy model seed (default 0, shipped)")
    parser.add_argument("--rows", type=int, default=3000, help="corpus rows (default 3000)")
    parser.add_argument("--fpr", type=float, default=0.01, help="calibration FPR (default 0.01)")
    parser.add_argument("--top", type=int, default=15, help="flagged captions to print (default 15)")
    parser.add_argument(
        "--local", action="store_true", help="score locally even if the Ray pipeline is installed"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    from auditor.report.calibration import calibrate_threshold, write_threshold_file
    from auditor.report.html import REPORT_FILE, write_report
    from auditor.scoring import Scorer
    from auditor.toy.manifest import load_manifest

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Toy model: the shipped one, or built once in --model-dir and reused.
    model_dir, info, how = resolve_model(args.model_dir, args.preset, args.seed)
    print(f"[1/5] toy model {model_dir} (preset {args.preset}, seed {args.seed}; {how})")
    manifest = load_manifest(model_dir)
    check = info.get("memorization_check", {})
    if check:
        print(
            f"      memorized captions reproduce their training latent: cosine {check['memorized_cosine_mean']:.3f} "
            f"(seen-once captions: {check['seen_once_cosine_mean']:.3f})"
        )

    # 2. Corpus, and the clean reference set (held-out captions, never in the corpus).
    files, n_memorized_rows = write_corpus(out, manifest, rows=args.rows, seed=args.seed)
    reference = out / "reference_clean.txt"
    reference.write_text("\n".join(manifest.held_out) + "\n", encoding="utf-8")
    print(
        f"[2/5] corpus: {out / 'corpus'} ({len(files)} files, {args.rows} rows; {n_memorized_rows} rows are copies "
        f"of the {len(manifest.memorized)} memorized captions)"
    )

    # 3. Calibrate the threshold at the target FPR on the clean reference.
    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32")
    record = calibrate_threshold(
        scorer, manifest.held_out, fpr=args.fpr, reference=str(reference), model=str(model_dir)
    )
    threshold_file = write_threshold_file(record, out / "threshold.json")
    print(
        f"[3/5] threshold {record['threshold']:.4f} at fpr {args.fpr:g} on {record['n_reference']} clean captions"
    )

    # 4. Audit: the Ray pipeline when installed, else the local scorer; same output layout.
    audit_out = out / "audit"
    if pipeline_available() and not args.local:
        print(f"[4/5] auditing with the Ray pipeline (local Ray) -> {audit_out}")
        run_pipeline_audit(out / "corpus", audit_out, model_dir, threshold_file)
    else:
        print(
            f"[4/5] auditing locally with the Scorer (--local, or the Ray pipeline is not installed) -> {audit_out}"
        )
        run_local_audit(files, audit_out, model_dir, record, threshold_file)

    report_top_flagged(audit_out, manifest, args.top)
    print(
        f"outputs: scores {audit_out / 'scores'}, flagged {audit_out / 'flagged'}, threshold {threshold_file}"
    )

    # 5. The HTML report: the audit writes it (--report, the default); an audit that did not is reported here.
    report = audit_out / REPORT_FILE
    if not report.is_file() or report.stat().st_mtime < (audit_out / "_audit.json").stat().st_mtime:
        write_report(str(audit_out))
    print(f"[5/5] demo finished in {time.perf_counter() - started:.0f}s")
    print(f"report: {report.resolve()}  (open it in a browser; `auditor report {audit_out}` rebuilds it)")
    return 0


def report_top_flagged(audit_out: Path, manifest, top: int) -> None:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from auditor import schema

    table = ds.dataset(audit_out / "scores", format="parquet", partitioning="hive").to_table(
        columns=[schema.CAPTION, schema.SCORE, schema.FLAGGED]
    )
    table = table.filter(pc.is_valid(table[schema.SCORE]))
    captions = table[schema.CAPTION].to_pylist()
    scores = np.asarray(table[schema.SCORE].to_pylist(), dtype=np.float64)
    flagged = np.asarray(table[schema.FLAGGED].to_pylist(), dtype=bool)
    memorized = set(manifest.memorized)
    is_mem = np.array([c in memorized for c in captions])
    order = np.argsort(-scores, kind="stable")
    # Unique captions by descending score: duplicates of one memorized caption would crowd the list.
    seen: set[str] = set()
    ranked = [i for i in order if not (captions[i] in seen or seen.add(captions[i]))]
    n_unique_mem = len({c for c, m in zip(captions, is_mem, strict=True) if m})
    top_unique = ranked[:n_unique_mem]
    print(
        f"flagged {int(flagged.sum())}/{len(captions)} rows: {int((flagged & is_mem).sum())}/{int(is_mem.sum())} "
        f"memorized rows and {int((flagged & ~is_mem).sum())}/{int((~is_mem).sum())} ordinary rows"
    )
    print(
        f"the {n_unique_mem} highest-scoring distinct captions hold "
        f"{sum(bool(is_mem[i]) for i in top_unique)} of the {n_unique_mem} memorized ones"
    )
    print(f"top {top} distinct captions by score (M = memorized by construction):")
    for i in ranked[:top]:
        mark = "M" if is_mem[i] else " "
        print(f"  {scores[i]:8.4f} {'FLAG' if flagged[i] else '    '} {mark}  {captions[i]}")


if __name__ == "__main__":
    sys.exit(main())
