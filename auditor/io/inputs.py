"""List input files (file, folder, glob or URI list), open them (decompressing text files) and peek at their
columns. fsspec/pyarrow only.

The listing is fsspec's own (`find`, `glob`); a file's format and codec come from its extensions
(auditor.formats) unless --format / --compression are given. Decompression is fsspec's.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import lzma
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import pyarrow.parquet as pq
from fsspec.compression import compr, register_compression
from fsspec.spec import AbstractFileSystem

from auditor.errors import ConfigError, InputDataError
from auditor.formats import (
    CODEC_EXTENSIONS,
    EXTENSIONS,
    QUERY_SCHEMES,
    STREAM_FORMATS,
    resolve_format,
    strip_extensions,
    url_path,
)
from auditor.io.storage import filesystem_for, to_uri
from auditor.redact import redact_text, redact_uri

try:  # zstd files: compression.zstd from Python 3.14 on, backports.zstd (a dependency) before
    from compression.zstd import ZstdError, ZstdFile  # type: ignore[import-not-found]
except ImportError:
    try:
        from backports.zstd import ZstdError, ZstdFile
    except ImportError:  # no zstd codec: fsspec refuses .zst files before any read
        ZstdError = ZstdFile = None  # type: ignore[misc,assignment]
if ZstdFile is not None and compr.get("zstd") is not ZstdFile:
    # fsspec releases before its backports.zstd support register zstandard's stream reader, which has no
    # readline, so line-based reading fails: use the file class, as newer fsspec does.
    register_compression("zstd", ZstdFile, "zst", force=True)

logger = logging.getLogger(__name__)

# What a truncated or corrupt compressed stream raises while it is read: EOFError (gzip, bz2, xz, zstd cut short),
# OSError (gzip BadGzipFile, bz2 "Invalid data stream"), the codecs' own errors.
DECOMPRESSION_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, *([ZstdError] if ZstdError else []))
GLOB_CHARS = re.compile(r"[*?\[]")
# Brace groups in INPUT: `{00000..01023}` or `{a,b}` (a `{` in a name without `..` or `,` stays as it is).
BRACE = re.compile(r"\{([^{}]*)\}")
MAX_BRACE_NAMES = 1_000_000
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
WEBDATASET_FORMAT = "webdataset"
# A WebDataset shard read from its sidecar parquet: not a --format (a listing finds it beside its tar).
SIDECAR_FORMAT = "webdataset_sidecar"
# txt files have one column: the caption. Named like Ray Data's read_text column.
TXT_COLUMN = "text"
# A JSON-lines file has no header: its columns are the keys of its first records, this many non-blank lines. A
# requested key that none of them has fails the file, as a missing column does in csv or parquet (at plan time on
# the sampled files, when read on the others); a key only some records lack gives those rows a null.
KEY_CHECK_RECORDS = 4096
# Excel and Windows Notepad start a UTF-8 text file with a byte order mark; it is not part of the first line.
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class InputFile:
    """One input file. source: its URI as written to the output (absolute path locally, s3://bucket/key remotely),
    without credentials (auditor.redact): its identity in ids, the ledger and every output. path: what the
    filesystem opens it by, credentials included (a signed URL's query, userinfo); held in memory only, never
    written or logged.

    relative: its path under the INPUT it was found from (a folder or a glob's fixed prefix), for outputs that
    mirror the input layout. shard: the Hive partition value of its rows in OUTPUT/scores. identity: what the
    store says about the file's content (size plus ETag, checksum or mtime), taken from the listing; a changed
    identity means a changed file. compression: the codec a text file is decompressed with (open_input).
    """

    source: str
    path: str
    format: str
    relative: str
    shard: str
    identity: str = ""
    compression: str | None = None  # fsspec's codec name (gzip, bz2, zstd, xz); None: read as it is
    # A WebDataset shard's sidecar parquet (img2dataset's `00000.parquet` beside `00000.tar`), its path as `path`
    # is; "" when it has none. Read instead of the tar when the format is SIDECAR_FORMAT.
    sidecar: str = ""


# Listing fields that change whenever an object's content does, in order of preference: content hashes first
# (S3/GCS/Azure and http ETag, GCS md5/crc32c), then modification time. Size is always added.
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
    "Last-Modified",  # an http(s) server without ETag
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
    """Stable, path-safe partition value for one input file: a readable stem plus a hash of the full URI.

    Hive readers infer a partition column's type from its values, so the key never reads as a number: a digit
    stem ending in "e" and an all-digit hash would make `1e-0123456789`, which polars reads as a float. Such a key
    gets an "h" before its hash (every key has a "-" and a hex hash, so it is never an integer or a date).
    """
    name = url_path(source).rstrip("/").rsplit("/", 1)[-1]
    stem = UNSAFE.sub("_", name.rsplit(".", 1)[0])[:48].strip("._") or "file"
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
    key = f"{stem}-{digest}"
    try:
        float(key)
    except ValueError:
        return key
    return f"{stem}-h{digest}"


def open_input(fs: AbstractFileSystem, file: InputFile) -> IO[bytes]:
    """The file's bytes for reading front to back, decompressed by fsspec when it has a codec."""
    return fs.open(file.path, "rb", compression=file.compression)


def _names_file(path: str, fmt: str | None) -> bool:
    """An http(s) URL with a query, whose path names an input format, or under --format: a file, not a page."""
    return path != url_path(path) or (
        path[:8].lower().startswith(QUERY_SCHEMES)
        and (fmt is not None or resolve_format(path, None, None)[0])
    )


def expand_braces(spec: str) -> list[str]:
    """The names a spec's brace groups stand for, as webdataset users write shard lists: `{00000..01023}` (zero-padded
    to its bounds' width when one starts with 0) and `{a,b}`; several groups multiply. A spec without one is itself.
    Raises ConfigError for a reversed range or more than MAX_BRACE_NAMES names."""
    match = next((m for m in BRACE.finditer(spec) if ".." in m.group(1) or "," in m.group(1)), None)
    if match is None:
        return [spec]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        low, high = int(bounds.group(1)), int(bounds.group(2))
        padded = any(b.startswith("0") and len(b) > 1 for b in bounds.groups())
        width = max(len(b) for b in bounds.groups()) if padded else 0
        if low > high or high - low >= MAX_BRACE_NAMES:
            raise ConfigError(
                f"INPUT {redact_uri(spec)}: the range {{{body}}} must go up, from START to END (at most "
                f"{MAX_BRACE_NAMES} names), as in {{00000..01023}}."
            )
        options = [str(i).zfill(width) for i in range(low, high + 1)]
    elif ".." in body and "," not in body:
        raise ConfigError(
            f"INPUT {redact_uri(spec)}: {{{body}}} is no range; a brace range is {{START..END}} of digits "
            "({00000..01023}); {a,b} lists names."
        )
    else:
        options = body.split(",")
    names = [
        name
        for option in options
        for name in expand_braces(spec[: match.start()] + option + spec[match.end() :])
    ]
    if len(names) > MAX_BRACE_NAMES:
        raise ConfigError(f"INPUT {redact_uri(spec)} names {len(names)} files; at most {MAX_BRACE_NAMES}.")
    return names


def _list_expanded(fs: AbstractFileSystem, path: str, shown: str) -> dict[str, dict[str, Any]]:
    """What a brace spec names, from one listing per folder (not a request per name): files as they are,
    folders with everything under them. Raises ConfigError naming the names that do not exist."""
    names = list(dict.fromkeys(expand_braces(path)))
    by_parent: dict[str, list[str]] = {}
    for name in names:
        by_parent.setdefault(name.rstrip("/").rsplit("/", 1)[0], []).append(name.rstrip("/"))
    candidates: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for parent, wanted in by_parent.items():
        try:
            listed = {entry["name"].rstrip("/"): entry for entry in fs.ls(parent, detail=True)}
        except FileNotFoundError:
            listed = {}
        for name in wanted:
            entry = listed.get(name)
            if entry is None:
                missing.append(name)
            elif entry.get("type") == "directory":
                candidates.update(fs.find(name, detail=True))
            else:
                candidates[name] = entry
    if missing:
        raise ConfigError(
            f"INPUT {shown}: {len(missing)} of the {len(names)} names its braces stand for do not exist: "
            f"{', '.join(redact_uri(m) for m in missing[:3])}{', ...' if len(missing) > 3 else ''}. Fix the range, "
            "or name only shards that exist."
        )
    return candidates


def _hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def _file_format(
    spec: str, path: str, fmt: str | None, compression: str | None
) -> tuple[str | None, str | None]:
    """(format, codec) of one listed file; raises ConfigError for parquet with a codec (it needs random access)."""
    file_format, codec = resolve_format(path, fmt, compression)
    if file_format is not None and codec is not None and file_format not in STREAM_FORMATS:
        raise ConfigError(
            f"INPUT {spec}: {redact_uri(path)} would be read as compressed {file_format} ({codec}), but only "
            f"{', '.join(STREAM_FORMATS)} files can be compressed (parquet compresses inside the file). Decompress "
            "it, or pass --compression none if it is not compressed."
        )
    return file_format, codec


def list_inputs(
    specs: tuple[str, ...],
    fmt: str | None,
    storage_options: dict[str, Any],
    compression: str | None = None,
    read_sidecars: bool = False,
) -> list[InputFile]:
    """Every input file the specs name, sorted by source, each once, with its identity from the same listing
    (one listing call per spec, no per-file request). fmt / compression: --format (a FORMATS name) and
    --compression (a COMPRESSIONS name), None to go by extension. Raises ConfigError when nothing is found.

    WebDataset shards with a sidecar parquet (pair_sidecars): the parquet is no input of its own; read_sidecars
    reads it instead of the tar, under the tar's name.
    """
    found: dict[str, InputFile] = {}
    for spec in specs:
        fs, path = filesystem_for(spec, storage_options)
        shown = redact_uri(spec)  # what messages say: the spec without its credentials
        try:
            # An http(s) URL's query is no glob ('?'), and a URL that names a file is one: fsspec's isdir would
            # download it whole to look for links.
            if expand_braces(path) != [path]:
                root = path[: path.index("{")].rsplit("/", 1)[0]
                candidates = _list_expanded(fs, path, shown)
            elif GLOB_CHARS.search(url_path(path)):
                root = GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
                listed = fs.glob(path, detail=True)
                candidates = {p: i for p, i in listed.items() if i.get("type") == "file"}
            elif not _names_file(path, fmt) and fs.isdir(path):
                root = path.rstrip("/")
                candidates = fs.find(path, detail=True)
            elif fs.isfile(path):
                if _file_format(shown, path, fmt, compression)[0] is None:
                    raise ConfigError(
                        f"INPUT {shown} has an unknown extension; name it .parquet, .jsonl, .json, .csv, .tsv, "
                        f".txt or .tar (WebDataset), the text ones and tars optionally compressed "
                        f"({', '.join(CODEC_EXTENSIONS)}: captions.jsonl.gz, shard.tar.gz), or pass --format."
                    )
                root, candidates = url_path(path).rsplit("/", 1)[0], {path: fs.info(path)}
            else:
                raise ConfigError(f"INPUT {shown} does not exist (no such file, folder or glob match).")
        except ConfigError:
            raise
        except Exception as exc:  # fsspec backends raise many types for "unreachable" and "denied"
            raise ConfigError(
                f"cannot list INPUT {shown} ({type(exc).__name__}: {redact_text(str(exc))}). Check the path, the "
                "endpoint (--storage-option endpoint_url=...) and credentials in the environment."
            ) from exc
        kept = 0
        for candidate in sorted(candidates):
            named = url_path(candidate)
            relative = named[len(root) :].lstrip("/") if named.startswith(root) else redact_uri(named)
            if any(_hidden(part) for part in relative.split("/")):
                continue
            file_format, codec = _file_format(shown, candidate, fmt, compression)
            if file_format is None:
                continue
            source = redact_uri(to_uri(fs, candidate))
            identity = file_identity(candidates[candidate])
            found.setdefault(
                source,
                InputFile(source, candidate, file_format, relative, shard_key(source), identity, codec),
            )
            kept += 1
        if kept == 0:
            raise ConfigError(
                f"INPUT {shown} holds no input files (looked for {', '.join(sorted(EXTENSIONS))}, the text ones "
                f"also followed by {', '.join(CODEC_EXTENSIONS)}; hidden and _ names skipped); pass --format to "
                "read other names."
            )
    return pair_sidecars([found[s] for s in sorted(found)], read_sidecars)


def pair_sidecars(files: list[InputFile], read_sidecars: bool) -> list[InputFile]:
    """img2dataset's layout: `00000.tar`, `00000.parquet` (one row per URL tried: key, caption, status) and
    `00000_stats.json` side by side. Such a parquet is the tar's sidecar, not an input: the shard is read one way,
    never both (its tar by default, its sidecar with read_sidecars), always under the tar's name, so ids, the
    ledger and outputs are the same either way. `<stem>_stats.json` beside a tar is img2dataset's shard summary,
    not captions."""
    shards = {strip_extensions(f.source): f for f in files if f.format == WEBDATASET_FORMAT}
    if not shards:
        return files
    sidecars = {
        strip_extensions(f.source): f
        for f in files
        if f.format == "parquet" and strip_extensions(f.source) in shards
    }
    stats = {f"{stem}_stats" for stem in shards}
    kept: list[InputFile] = []
    for f in files:
        stem = strip_extensions(f.source)
        if f.format != WEBDATASET_FORMAT and (stem in sidecars or (stem in stats and f.format == "jsonl")):
            continue
        if f.format == WEBDATASET_FORMAT and stem in sidecars:
            sidecar = sidecars[stem]
            f = dataclasses.replace(f, sidecar=sidecar.path)
            if read_sidecars:
                f = dataclasses.replace(
                    f, path=sidecar.path, format=SIDECAR_FORMAT, identity=sidecar.identity, compression=None
                )
        kept.append(f)
    if sidecars:
        logger.info(
            "%d of %d WebDataset shards have a sidecar parquet (img2dataset's layout): reading their %s (%s)",
            len(sidecars),
            len(shards),
            "sidecars, as --read-sidecars asks" if read_sidecars else "tars",
            "only rows with status success, the samples the tar holds"
            if read_sidecars
            else "what the trainer reads; `auditor audit --read-sidecars` reads the parquets, a thousandth of the bytes",
        )
    return kept


def peek_columns(fs: AbstractFileSystem, file: InputFile, wanted: Sequence[str] = ()) -> list[str] | None:
    """Column names of one file: its parquet footer, its csv/tsv header (a UTF-8 byte order mark dropped), or the
    keys of its first KEY_CHECK_RECORDS jsonl records in order of appearance (wanted: stop reading records once
    all of these keys are seen). None: a csv/tsv/jsonl file with no header and no record (0 bytes, or blank
    lines only), which lacks no column and audits as 0 rows. Raises InputDataError if unreadable (for jsonl: its
    first record is not a JSON object; later bad lines are left to the reader, as bad rows).
    """
    try:
        if file.format == "parquet":
            with fs.open(file.path, "rb") as fh:
                return list(pq.read_schema(fh).names)
        if file.format == "txt":
            return [TXT_COLUMN]
        with open_input(fs, file) as fh:
            if file.format == "jsonl":
                return jsonl_keys(fh, wanted)
            for number, raw in enumerate(fh):
                line = raw.removeprefix(UTF8_BOM if number == 0 else b"").decode("utf-8").strip()
                if line:
                    delimiter = "\t" if file.format == "tsv" else ","
                    return next(csv.reader(io.StringIO(line), delimiter=delimiter))
        return None
    except InputDataError as exc:
        raise InputDataError(f"{file.source}: {exc}") from exc
    except Exception as exc:  # fsspec and aiohttp errors name the URL they failed on, credentials included
        if file.compression is not None and isinstance(exc, DECOMPRESSION_ERRORS):
            raise InputDataError(decompression_error(file, exc)) from exc
        raise InputDataError(
            f"{file.source} is not readable as {file.format}: {type(exc).__name__}: {redact_text(str(exc))}"
        ) from exc


def jsonl_keys(lines: IO[bytes], wanted: Sequence[str] = ()) -> list[str] | None:
    """Keys of the JSON objects among the first KEY_CHECK_RECORDS non-blank lines, in order of appearance; fewer
    lines once every wanted key is seen (a plan then reads one record per file, as csv reads one header line).
    None when there is no non-blank line: no record, so no key is missing."""
    keys: dict[str, None] = {}
    records = 0
    for number, raw in enumerate(lines):
        line = raw.removeprefix(UTF8_BOM if number == 0 else b"").strip()
        if not line:
            continue
        if records == 0:
            if line.startswith(b"["):
                raise InputDataError(json_array_error())
            record = json.loads(line)
            if not isinstance(record, dict):
                raise InputDataError(f"first record is {type(record).__name__}, expected a JSON object")
        else:
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
        if isinstance(record, dict):
            keys.update(dict.fromkeys(record))
        records += 1
        if records == KEY_CHECK_RECORDS or (wanted and all(name in keys for name in wanted)):
            break
    return list(keys) if records else None


def missing_columns_error(file: InputFile, missing: list[str], present: list[str]) -> str:
    """The message for a file that lacks requested columns (jsonl: keys) while the audit goes on with the others."""
    names = ", ".join(repr(name) for name in missing)
    if file.format == "jsonl":
        key, that = ("keys", "those keys") if len(missing) > 1 else ("key", "that key")
        return (
            f"{file.source}: no record has the {key} {names} (keys are read from the first {KEY_CHECK_RECORDS} "
            f"records of a JSON-lines file, as from a csv header); keys are: {', '.join(present) or '(none)'}. Give "
            f"its records {that} (null where a record has no value), or leave this file out of INPUT."
        )
    return (
        f"{file.source} has no column {names}; columns are: {', '.join(present) or '(none)'}. Rename the column in "
        "this file, or leave this file out of INPUT."
    )


def json_array_error() -> str:
    return (
        "the file holds a JSON array; .json and .jsonl inputs are JSON lines (one object per line). Convert it "
        "with: jq -c '.[]' IN.json > OUT.jsonl"
    )


def decompression_error(file: InputFile, exc: BaseException) -> str:
    """The message for a compressed file that breaks while it is read (truncated, corrupt, or not that codec)."""
    return (
        f"{file.source} cannot be decompressed as {file.compression} ({type(exc).__name__}: "
        f"{redact_text(str(exc))}): the archive is "
        "truncated or corrupt, or not compressed that way. Replace the file, or pass --compression to name its "
        "codec (none: not compressed)."
    )
