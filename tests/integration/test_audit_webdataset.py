"""WebDataset shards end to end on a local Ray: audit the tars, clean them with `auditor filter`, read the cleaned
shards back with the readers trainers use (webdataset.WebDataset, ray.data.read_webdataset)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from audit_corpus import captions

from auditor import schema
from auditor.config import AuditConfig, FilterConfig
from tests.scores_close import assert_scores_close

pytestmark = pytest.mark.integration


def write_shards(root: Path) -> dict[str, list[dict]]:
    """Two good shards (one gzipped) written by webdataset.TarWriter, one truncated, one empty."""
    root.mkdir(parents=True)
    texts = captions("a photo of a", 24)
    shards: dict[str, list[dict]] = {}
    for number, name in enumerate(("00000.tar", "00001.tar.gz")):
        samples = []
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(12):
                key = f"{number:05d}{i:04d}"
                sample = {"__key__": key, "jpg": os.urandom(1500), "txt": texts[number * 12 + i]}
                sample["json"] = {"caption": sample["txt"], "key": key}
                sink.write(sample)
                samples.append(sample)
        shards[name] = samples
    # img2dataset's sidecar beside the first shard: rows in another order, failed downloads that are not in the tar.
    rows = [{"key": s["__key__"], "caption": s["txt"], "status": "success"} for s in shards["00000.tar"]]
    rows = rows[::-1] + [{"key": "999999999", "caption": "never downloaded", "status": "failed_to_download"}]
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"successes": 12}, indent=4))
    good = (root / "00000.tar").read_bytes()
    (root / "00002.tar").write_bytes(good[: len(good) // 2 + 100])
    (root / "00003.tar").write_bytes(b"")
    return shards


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path, "r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def test_audit_tars_then_clean_them(ray_local, tmp_path, micro_model_dir, micro_scorer):
    from auditor.pipeline.audit import run
    from auditor.pipeline.filter import run_filter

    shards = write_shards(tmp_path / "in")
    texts = [s["txt"] for samples in shards.values() for s in samples]
    reference = dict(zip(texts, micro_scorer.score(texts).tolist(), strict=True))
    threshold = float(np.median(list(reference.values())))
    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(micro_model_dir),
        threshold=threshold, dtype="fp32", batch_size=8, quiet=True,
    )  # fmt: skip
    result = run(cfg)

    # 1. The truncated shard fails alone, naming the tar error; the empty one is 0 rows; one row per sample.
    assert result.exit_code == 1 and list(result.failed) == [str(tmp_path / "in" / "00002.tar")]
    audit = json.loads((tmp_path / "out" / "_audit.json").read_text())
    assert "is not a readable tar (ReadError" in audit["files"]["failed"][0]["error"]
    rows = pads.dataset(str(tmp_path / "out" / "scores"), format="parquet", partitioning="hive").to_table()
    rows = rows.to_pylist()
    by_id = {r["id"]: r for r in rows}
    expected_ids = {f"{tmp_path / 'in' / name}:{s['__key__']}" for name, v in shards.items() for s in v}
    assert set(by_id) == expected_ids and len(rows) == 24
    assert_scores_close([r["score"] for r in rows], [reference[r["caption"]] for r in rows])
    flagged = {r["id"].rsplit(":", 1)[1] for r in rows if r["flagged"]}
    assert 0 < len(flagged) < 24
    # A rerun skips the complete shards (the ledger knows each as one unit) and tries the broken one again.
    again = run(cfg)
    assert again.files_skipped == 3 and list(again.failed) == [str(tmp_path / "in" / "00002.tar")]
    # The same shards read from their sidecar where one is beside: the same ids, captions and scores.
    sidecar_cfg = dataclasses.replace(cfg, output=str(tmp_path / "out-sidecar"), read_sidecars=True)
    assert run(sidecar_cfg).exit_code == 1
    again = pads.dataset(str(tmp_path / "out-sidecar" / "scores"), format="parquet", partitioning="hive")
    again = {r["id"]: r for r in again.to_table().to_pylist()}
    assert set(again) == set(by_id)
    assert all(
        again[i]["caption"] == r["caption"] and again[i]["flagged"] == r["flagged"] for i, r in by_id.items()
    )
    # Scores equal up to the batch a caption shared (another read order batches captions differently).
    assert_scores_close([again[i]["score"] for i in by_id], [r["score"] for r in by_id.values()])

    # 2. Cleaned shards: same names, exactly the unflagged samples, every kept member byte-identical.
    drop = run_filter(FilterConfig(inputs=(str(tmp_path / "in"),), audit_output=str(tmp_path / "out"),
                                   output=str(tmp_path / "clean"), quiet=True))  # fmt: skip
    failed = [f for f in drop.files if f["error"]]
    assert [Path(f["source"]).name for f in failed] == ["00002.tar"] and "not a readable tar" in failed[0][
        "error"
    ]
    assert sum(f["written"] + f["flagged"] for f in drop.files if not f["error"]) == 24
    assert drop.counts["flagged"] - failed[0]["flagged"] == len(flagged)
    for name in shards:
        cleaned = tmp_path / "clean" / name
        expected = [m for m in members(tmp_path / "in" / name) if m[0].split(".")[0] not in flagged]
        assert members(cleaned) == expected
        keys = [s["__key__"] for s in wds.WebDataset(str(cleaned), shardshuffle=False)]
        assert keys == [s["__key__"] for s in shards[name] if s["__key__"] not in flagged]
    # The sidecar is cleaned with its shard: the flagged samples' rows go, the failed download stays.
    sidecar = pq.read_table(tmp_path / "clean" / "00000.parquet").column("key").to_pylist()
    assert sidecar == [s["__key__"] for s in shards["00000.tar"][::-1] if s["__key__"] not in flagged] + [
        "999999999"
    ]
    import ray

    read = ray.data.read_webdataset(str(tmp_path / "clean" / "00000.tar"), decoder=None).take_all()
    assert sorted(r["__key__"] for r in read) == sorted(
        s["__key__"] for s in shards["00000.tar"] if s["__key__"] not in flagged
    )
    by_key = {s["__key__"]: s for s in shards["00000.tar"]}
    assert all(r["jpg"] == by_key[r["__key__"]]["jpg"] for r in read)
    # A rerun replaces the shards, never duplicates; no temporary file is left.
    run_filter(FilterConfig(inputs=(str(tmp_path / "in"),), audit_output=str(tmp_path / "out"),
                            output=str(tmp_path / "clean"), quiet=True))  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == [
        "00000.parquet", "00000.tar", "00001.tar.gz", "00003.tar", "_filter.json",
    ]  # fmt: skip

    # 3. Mark mode: the tars stay; one parquet per shard keyed by __key__.
    run_filter(FilterConfig(inputs=(str(tmp_path / "in"),), audit_output=str(tmp_path / "out"),
                            output=str(tmp_path / "marked"), mode="mark", quiet=True))  # fmt: skip
    marked = pq.read_table(tmp_path / "marked" / "00001.parquet").to_pylist()
    assert [r["__key__"] for r in marked] == [s["__key__"] for s in shards["00001.tar.gz"]]
    assert all(r[schema.MEMORIZATION_FLAG] == (r["__key__"] in flagged) for r in marked)


def test_brace_range_of_shards_on_s3(s3_endpoint, tmp_path):
    """`s3://bucket/laion/{00000..00002}.tar`: one listing of the folder, each named shard read from the bucket."""
    import s3fs

    from auditor.io.inputs import list_inputs
    from auditor.io.readers import read_caption_batches
    from auditor.io.storage import filesystem_for

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("wds-bucket")
    for i in range(4):
        with wds.TarWriter(str(tmp_path / f"{i:05d}.tar")) as sink:
            sink.write({"__key__": f"k{i}", "txt": f"caption {i}", "jpg": b"\xff\xd8"})
        fs.put(str(tmp_path / f"{i:05d}.tar"), f"wds-bucket/laion/{i:05d}.tar")
    options = {"endpoint_url": s3_endpoint}
    files = list_inputs(("s3://wds-bucket/laion/{00000..00002}.tar",), None, options)
    assert [(f.source, f.relative, f.format) for f in files] == [
        (f"s3://wds-bucket/laion/{i:05d}.tar", f"{i:05d}.tar", "webdataset") for i in range(3)
    ]
    captions = [
        c
        for f in files
        for t in read_caption_batches(filesystem_for(f.source, options)[0], f, "txt")
        for c in t.column(schema.CAPTION).to_pylist()
    ]
    assert captions == ["caption 0", "caption 1", "caption 2"]


def test_add_memorization_scores_on_read_webdataset(ray_local, tmp_path, micro_model_dir, micro_scorer):
    """A user's own pipeline: ray.data.read_webdataset, captions in the txt column as str (default decoder) or
    bytes (decoder=None)."""
    import ray

    from auditor.ray_data import MemorizationScorer, add_memorization_scores

    texts = captions("a drawing of a", 6)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        for i, text in enumerate(texts):
            sink.write({"__key__": f"{i:04d}", "txt": text, "json": {"i": i}})
    reference = dict(zip(texts, micro_scorer.score(texts).tolist(), strict=True))
    ds = ray.data.read_webdataset(str(tmp_path / "00000.tar"), decoder=None)  # txt as bytes
    scored = add_memorization_scores(
        ds, model=str(micro_model_dir), caption_column="txt", dtype="fp32", gpus_per_actor=0, batch_size=4
    ).take_all()
    assert len(scored) == 6 and all(isinstance(row["txt"], bytes) for row in scored)
    for row in scored:
        assert row[schema.MEMORIZATION_STATUS] == schema.OK
        assert_scores_close(row[schema.MEMORIZATION_SCORE], reference[row["txt"].decode()])
    # The default decoder gives str captions: the same scores, here through the callable class alone.
    batch = ray.data.read_webdataset(str(tmp_path / "00000.tar")).take_batch(6, batch_format="pyarrow")
    scorer = MemorizationScorer(model=str(micro_model_dir), caption_column="txt", dtype="fp32")
    decoded = scorer(batch)
    assert_scores_close(
        decoded.column(schema.MEMORIZATION_SCORE).to_pylist(),
        [reference[t] for t in decoded.column("txt").to_pylist()],
    )
    # Bytes that are not UTF-8 are a bad record, never an error; in every batch kind.
    arrow = scorer(pa.table({"txt": pa.array([texts[0].encode(), b"\xff\xfe", None], pa.binary())}))
    assert arrow.column(schema.MEMORIZATION_STATUS).to_pylist() == [
        schema.OK,
        schema.BAD_RECORD,
        schema.NULL_CAPTION,
    ]
    mixed = scorer({"txt": np.array([texts[0], b"\xff", texts[1].encode()], dtype=object)})
    assert list(mixed[schema.MEMORIZATION_STATUS]) == [schema.OK, schema.BAD_RECORD, schema.OK]


def img2dataset_command() -> list[str] | None:
    """img2dataset's command: IMG2DATASET (an executable, e.g. in a venv of its own), else one on PATH."""
    found = os.environ.get("IMG2DATASET") or shutil.which("img2dataset")
    return [found] if found else None


@pytest.mark.skipif(
    img2dataset_command() is None,
    reason="img2dataset is not installed: its pins would downgrade webdataset and add pandas/opencv/wandb to the "
    "project's venv, so install it in a venv of its own (pip install img2dataset==1.47.0) and set "
    "IMG2DATASET=<that venv>/bin/img2dataset",
)
def test_img2dataset_shards_read_from_tars_and_sidecars_alike(ray_local, tmp_path, micro_model_dir):
    """Shards written by img2dataset itself, downloading from a local http.server (3 URLs fail): the tars and the
    sidecars give the same ids and captions, the failed downloads and the _stats.json files count nowhere, and
    an audit of each way gives the same ids, captions and scores."""
    import functools
    import subprocess
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    from auditor.io.inputs import list_inputs
    from auditor.io.readers import read_caption_batches
    from auditor.io.storage import filesystem_for

    (tmp_path / "www").mkdir()
    for i in range(10):
        Image.new("RGB", (32, 32), (i * 20, 100, 200)).save(tmp_path / "www" / f"{i}.jpg")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/{i}.jpg" for i in range(10)] + [f"{base}/missing-{i}.jpg" for i in range(3)]
        texts = captions("a photo of a", 13)
        pq.write_table(pa.table({"url": urls, "caption": texts}), tmp_path / "urls.parquet")
        subprocess.run(
            [*img2dataset_command(), "--url_list", str(tmp_path / "urls.parquet"), "--input_format", "parquet",
             "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
             "--output_folder", str(tmp_path / "shards"), "--processes_count", "1", "--thread_count", "4",
             "--resize_mode", "no", "--number_sample_per_shard", "5", "--enable_wandb", "False"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert sorted(
        p.name for p in (tmp_path / "shards").glob("*_stats.json")
    )  # img2dataset's layout, stats included
    read = {}
    for sidecars in (False, True):
        files = list_inputs((str(tmp_path / "shards"),), None, {}, read_sidecars=sidecars)
        assert {f.format for f in files} == {"webdataset_sidecar" if sidecars else "webdataset"}
        read[sidecars] = sorted(
            (i, c)
            for f in files
            for t in read_caption_batches(
                filesystem_for(f.source)[0], f, "caption", keep_columns=("json:url",)
            )
            for i, c in zip(
                t.column(schema.ID).to_pylist(), t.column(schema.CAPTION).to_pylist(), strict=True
            )
        )
    assert read[False] == read[True]
    assert sorted(c for _, c in read[False]) == sorted(texts[:10])  # the 3 failed downloads count nowhere

    from auditor.pipeline.audit import run

    audited = {}
    for sidecars in (False, True):
        out = tmp_path / f"out-{sidecars}"
        cfg = AuditConfig(inputs=(str(tmp_path / "shards"),), output=str(out), model=str(micro_model_dir),
                          dtype="fp32", quiet=True, report=False, read_sidecars=sidecars)  # fmt: skip
        result = run(cfg)
        assert result.exit_code == 0 and result.counts["rows"] == 10
        table = pads.dataset(str(out / "scores"), format="parquet", partitioning="hive").to_table()
        audited[sidecars] = sorted(
            (r[schema.ID], r[schema.CAPTION], r[schema.SCORE]) for r in table.to_pylist()
        )
    assert [(i, c) for i, c, _ in audited[True]] == [(i, c) for i, c, _ in audited[False]] == read[False]
    assert_scores_close([s for *_, s in audited[True]], [s for *_, s in audited[False]])


def test_cleaning_a_gzipped_shard_on_s3_writes_it_whole(s3_endpoint, tmp_path):
    """filter_file (one Ray task's work, called here without Ray) on a bucket: the cleaned .tar.gz appears under its
    own name, gzipped, only once it is whole (no temporary object left), and a rerun replaces it."""
    import gzip

    import s3fs

    from auditor.io.inputs import list_inputs
    from auditor.io.parquet import SCORES_DIR, shard_dir
    from auditor.pipeline.filter import filter_file

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("wds-clean")
    with wds.TarWriter(str(tmp_path / "00000.tar.gz")) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "txt": f"caption {i}", "jpg": os.urandom(500)})
    fs.put_file(str(tmp_path / "00000.tar.gz"), "wds-clean/in/00000.tar.gz")
    options = {"endpoint_url": s3_endpoint}
    [file] = list_inputs(("s3://wds-clean/in/",), None, options)
    # The audit's verdicts for this shard, as an audit writes them (one part file under scores/shard=<key>/).
    folder = Path(shard_dir(str(tmp_path / "audit" / SCORES_DIR), file.shard))
    folder.mkdir(parents=True)
    ids = [f"{file.source}:k{i}" for i in range(5)]
    pq.write_table(
        pa.table({schema.ID: ids, schema.FLAGGED: [i in (1, 3) for i in range(5)],
                  schema.SCORE: pa.array([0.1] * 5, pa.float32())}),
        folder / "part-u000000.parquet",
    )  # fmt: skip
    cfg = FilterConfig(inputs=("s3://wds-clean/in/",), audit_output=str(tmp_path / "audit"),
                       output="s3://wds-clean/clean", storage_options=options, quiet=True)  # fmt: skip
    for _ in range(2):
        summary = filter_file(cfg, None, file)
        assert summary["error"] is None and (summary["rows"], summary["flagged"], summary["written"]) == (
            5,
            2,
            3,
        )
        assert fs.ls("wds-clean/clean") == ["wds-clean/clean/00000.tar.gz"]
    local = tmp_path / "clean.tar.gz"
    fs.get_file("wds-clean/clean/00000.tar.gz", str(local))
    assert gzip.decompress(local.read_bytes())[:5] != b""  # gzipped as the input was
    assert [s["__key__"] for s in wds.WebDataset(str(local), shardshuffle=False)] == ["k0", "k2", "k4"]
