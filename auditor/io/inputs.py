"""List input files (file, folder, glob or URI list) and peek at their columns. fsspec/pyarrow only.

The listing is fsspec's own (`find`, `glob`); a file's format comes from its extension unless --format is given.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
from fsspec.spec import AbstractFileSystem

from auditor.errors import ConfigError, InputDataError
from auditor.io.storage import filesystem_for, to_uri

logger = logging.getLogger(__name__)

EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
}
GLOB_CHARS = re.compile(r"[*?\[]")
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# txt files have one column: the caption. Named like Ray Data's read_text column.
TXT_COLUMN = "text"


@dataclass(frozen=True)
class InputFile:
    """One input file. source: its URI as written to the output (absolute path locally, s3://bucket/key remotely).

    relative: its path under the INPUT it was found from (a folder or a glob's fixed prefix), for outputs that
    mirror the input layout. shard: the Hive partition value of its rows in OUTPUT/scores. identity: what the
    store says about the file's content (size plus ETag, checksum or mtime), taken from the listing; a changed
    identity means a changed file.
    """

    source: str
    path: str
    format: str
    relative: str
    shard: str
    identity: str = ""


# Listing fields that change whenever an object's content does, in order of preference: content hashes first
# (S3/GCS/Azure ETag, GCS md5/crc32c), then modification time. Size is always added.
IDENTITY_KEYS = (
    "ETag",
    "etag",
    "md5Hash",
    "crc32c",
    "checksum",
    "mtime",
    "LastModified",
    "last_modified",
    "updated",
)


def file_identity(info: dict[str, Any]) -> str:
    """`size=<bytes>;<key>=<value>` from an fsspec listing entry: equal identities mean the same content."""
    parts = [f"size={info.get('size')}"]
    for key in IDENTITY_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            parts.append(f"{key}={str(value).strip(chr(34))}")
            break
    return ";".join(parts)


def shard_key(source: str) -> str:
    """Stable, path-safe partition value for one input file: a readable stem plus a hash of the full URI."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    stem = UNSAFE.sub("_", name.rsplit(".", 1)[0])[:48].strip("._") or "file"
    return f"{stem}-{hashlib.sha1(source.encode('utf-8')).hexdigest()[:10]}"


def format_of(path: str, forced: str | None) -> str | None:
    if forced:
        return forced
    lowered = path.lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if lowered.endswith(ext)), None)


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def list_inputs(specs: tuple[str, ...], fmt: str | None, storage_options: dict[str, Any]) -> list[InputFile]:
    """Every input file the specs name, sorted by source, each once, with its identity from the same listing
    (one listing call per spec, no per-file request). Raises ConfigError when nothing is found.
    """
    found: dict[str, InputFile] = {}
    for spec in specs:
        fs, path = filesystem_for(spec, storage_options)
        try:
            if GLOB_CHARS.search(path):
                root = GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
                listed = fs.glob(path, detail=True)
                candidates = {p: i for p, i in listed.items() if i.get("type") == "file"}
            elif fs.isdir(path):
                root = path.rstrip("/")
                candidates = fs.find(path, detail=True)
            elif fs.isfile(path):
                if format_of(path, fmt) is None:
                    raise ConfigError(
                        f"INPUT {spec} has an unknown extension; name it .parquet, .jsonl, .csv, .tsv or .txt, "
                        "or pass --format."
                    )
                root, candidates = path.rsplit("/", 1)[0], {path: fs.info(path)}
            else:
                raise ConfigError(f"INPUT {spec} does not exist (no such file, folder or glob match).")
        except ConfigError:
            raise
        except Exception as exc:  # fsspec backends raise many types for "unreachable" and "denied"
            raise ConfigError(
                f"cannot list INPUT {spec} ({type(exc).__name__}: {exc}). Check the path, the endpoint "
                "(--storage-option endpoint_url=...) and credentials in the environment."
            ) from exc
        kept = 0
        for candidate in sorted(candidates):
            relative = candidate[len(root) :].lstrip("/") if candidate.startswith(root) else candidate
            file_format = format_of(candidate, fmt)
            if file_format is None or any(_hidden(part) for part in relative.split("/")):
                continue
            source = to_uri(fs, candidate)
            identity = file_identity(candidates[candidate])
            found.setdefault(
                source, InputFile(source, candidate, file_format, relative, shard_key(source), identity)
            )
            kept += 1
        if kept == 0:
            raise ConfigError(
                f"INPUT {spec} holds no input files (looked for {', '.join(sorted(EXTENSIONS))}, hidden and _ names "
                "skipped); pass --format to read other names."
            )
    return [found[s] for s in sorted(found)]


def peek_columns(fs: AbstractFileSystem, file: InputFile) -> list[str]:
    """Column names of one file, read from its footer or first record. Raises InputDataError if unreadable."""
    try:
        if file.format == "parquet":
            with fs.open(file.path, "rb") as fh:
                return list(pq.read_schema(fh).names)
        if file.format == "txt":
            return [TXT_COLUMN]
        with fs.open(file.path, "rb") as fh:
            for raw in fh:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                if file.format == "jsonl":
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise InputDataError(
                            f"first record is {type(record).__name__}, expected a JSON object"
                        )
                    return list(record)
                delimiter = "\t" if file.format == "tsv" else ","
                return next(csv.reader(io.StringIO(line), delimiter=delimiter))
        return []
    except InputDataError as exc:
        raise InputDataError(f"{file.source}: {exc}") from exc
    except Exception as exc:
        raise InputDataError(
            f"{file.source} is not readable as {file.format}: {type(exc).__name__}: {exc}"
        ) from exc
