"""How fast one read task pulls captions out of WebDataset shards, against the storage bound; prints the table for
BENCHMARKS.md (WebDataset input).

Shards as img2dataset writes them (`00000.tar` with {key}.jpg / .txt / .json, `00000.parquet` beside it), with
realistic member sizes (--image-kb random bytes standing for a JPEG, ~--caption-bytes captions). For each store
(local disk; moto S3 with --s3), in this one process, one shard after another (one read task):
  plain   a sequential read of the tars' bytes to EOF, nothing parsed: the storage bound
  tars    auditor's WebDataset reader (auditor.io.webdataset): captions/s and MB/s of tar read
  sidecar the same captions from the sidecar parquets (--read-sidecars)
plus bytes per caption each way (the sizes of the files read: a sidecar read skips its other columns), and how many read tasks keep one GPU actor at --gpu-rate captions/s fed.
Usage: python bench/webdataset.py [--shards 4] [--samples 1000] [--image-kb 40] [--s3] [--json out.json]
Run on an otherwise idle machine; --smoke runs a tiny set to check the code paths, not a measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import socket
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from auditor.io.inputs import list_inputs  # noqa: E402
from auditor.io.readers import read_caption_batches  # noqa: E402
from auditor.io.storage import filesystem_for  # noqa: E402

CHUNK = 8 << 20


def write_shards(root: Path, shards: int, samples: int, image_kb: int, caption_bytes: int) -> None:
    """img2dataset's layout: tar members in key order, the sidecar in another order with 5% failed downloads."""
    words = ("a photo of a", "red", "small", "dog", "on the beach", "at sunset", "painting", "city", "street")
    for shard in range(shards):
        rows = []
        with tarfile.open(root / f"{shard:05d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(samples):
                key = f"{shard:05d}{i:04d}"
                caption = " ".join(words[(i + j) % len(words)] for j in range(caption_bytes // 6))[
                    :caption_bytes
                ]
                meta = json.dumps({"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key})
                for field, data in (
                    ("jpg", os.urandom(image_kb * 1024)),
                    ("txt", caption.encode()),
                    ("json", meta.encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size, info.mtime = len(data), 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
                rows.append({"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key,
                             "status": "success"})  # fmt: skip
        rows += [
            {"url": f"http://example.com/f{i}", "caption": "x", "key": f"f{shard:05d}{i:04d}",
             "status": "failed_to_download"}
            for i in range(samples // 20)
        ]  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows[::-1]), root / f"{shard:05d}.parquet")


def time_plain(files, options) -> tuple[float, int]:
    started, total = time.perf_counter(), 0
    for file in files:
        fs, _ = filesystem_for(file.source, options)
        with fs.open(file.path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                total += len(chunk)
    return time.perf_counter() - started, total


def time_captions(files, options, caption: str) -> tuple[float, int]:
    started, captions = time.perf_counter(), 0
    for file in files:
        fs, _ = filesystem_for(file.source, options)
        for table in read_caption_batches(fs, file, caption):
            captions += table.num_rows
    return time.perf_counter() - started, captions


def measure(spec: str, options: dict, sizes: dict[str, int], gpu_rate: float, repeats: int) -> list[dict]:
    tars = list_inputs((spec,), None, options)
    sidecars = list_inputs((spec,), None, options, read_sidecars=True)
    plain = min(time_plain(tars, options)[0] for _ in range(repeats))
    tar_bytes = sum(sizes[f.relative] for f in tars)
    side_bytes = sum(sizes[f.relative.replace(".tar", ".parquet")] for f in tars)
    rows = [{"path": "plain read", "seconds": plain, "captions": None, "bytes": tar_bytes}]
    for name, files, read_bytes in (("tars", tars, tar_bytes), ("sidecars", sidecars, side_bytes)):
        seconds, captions = min(
            (time_captions(files, options, "txt") for _ in range(repeats)), key=lambda r: r[0]
        )
        rows.append({"path": name, "seconds": seconds, "captions": captions, "bytes": read_bytes})
    for row in rows:
        row["mb_per_s"] = row["bytes"] / row["seconds"] / 1e6
        if row["captions"]:
            row["captions_per_s"] = row["captions"] / row["seconds"]
            row["bytes_per_caption"] = row["bytes"] / row["captions"]
            row["read_tasks_per_gpu"] = math.ceil(gpu_rate / row["captions_per_s"])
    return rows


def start_moto() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def print_table(results: dict[str, list[dict]], gpu_rate: float) -> None:
    print(f"{'store':8} {'path':11} {'captions/s':>11} {'MB/s':>8} {'bytes/caption':>14} {'tasks/GPU':>10}")
    for store, rows in results.items():
        for row in rows:
            rate = f"{row['captions_per_s']:,.0f}" if row.get("captions_per_s") else "-"
            per = f"{row['bytes_per_caption']:,.0f}" if row.get("bytes_per_caption") else "-"
            tasks = str(row["read_tasks_per_gpu"]) if row.get("read_tasks_per_gpu") else "-"
            print(f"{store:8} {row['path']:11} {rate:>11} {row['mb_per_s']:>8.1f} {per:>14} {tasks:>10}")
    print(
        f"tasks/GPU: read tasks that keep one GPU actor at {gpu_rate:g} captions/s fed (one task = one CPU)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1000, help="samples per shard")
    parser.add_argument("--image-kb", type=int, default=40)
    parser.add_argument("--caption-bytes", type=int, default=100)
    parser.add_argument("--gpu-rate", type=float, default=450.0, help="captions/s of one GPU actor")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per path")
    parser.add_argument("--s3", action="store_true", help="also through a moto S3 server on 127.0.0.1")
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shards, one run: checks the code, no numbers"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.shards, args.samples, args.image_kb, args.repeats = 2, 20, 2, 1
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_shards(root, args.shards, args.samples, args.image_kb, args.caption_bytes)
        sizes = {p.name: p.stat().st_size for p in root.iterdir()}
        results["local"] = measure(str(root), {}, sizes, args.gpu_rate, args.repeats)
        if args.s3:
            import s3fs

            server, endpoint = start_moto()
            try:
                fs = s3fs.S3FileSystem(endpoint_url=endpoint)
                fs.mkdir("bench")
                for path in sorted(root.iterdir()):
                    fs.put_file(str(path), f"bench/shards/{path.name}")
                options = {"endpoint_url": endpoint}
                results["moto-s3"] = measure(
                    "s3://bench/shards/", options, sizes, args.gpu_rate, args.repeats
                )
            finally:
                server.stop()
    print_table(results, args.gpu_rate)
    if args.json:
        meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "smoke": args.smoke, **vars(args)}
        Path(args.json).write_text(json.dumps({"settings": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
