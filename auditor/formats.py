"""Input formats and compression codecs, by name and by file name ending: the one mapping that the config, the
listing (auditor.io.inputs) and `auditor filter` use. Pure Python; imports nothing.
"""

from __future__ import annotations

import re

FORMATS = ("parquet", "jsonl", "csv", "tsv", "txt", "webdataset")
# A file's format from how its name ends. `.json` is JSON lines too (one object per line), as most caption dumps
# named .json are; a file holding one JSON array is refused with the command that converts it.
EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".tar": "webdataset",
}
# Names that are a format and a codec in one extension.
COMPOUND_EXTENSIONS = {".tgz": ".tar.gz"}
# Formats read front to back as a byte stream, which a codec can wrap; parquet compresses inside the file and needs
# random access, so `captions.parquet.gz` is not an input.
TEXT_FORMATS = ("jsonl", "csv", "tsv", "txt")
# Formats a codec can wrap: the text ones and WebDataset tars (`shard.tar.gz`, `shard.tgz`).
STREAM_FORMATS = (*TEXT_FORMATS, "webdataset")
# Codecs by the extension after the format's (`captions.jsonl.gz`), under the names fsspec decompresses them by
# (zstd through backports.zstd before Python 3.14, compression.zstd from it on).
CODEC_EXTENSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}
# `--compression none` reads every file as it is, whatever its name ends in.
NO_COMPRESSION = "none"
COMPRESSIONS = (*CODEC_EXTENSIONS.values(), NO_COMPRESSION)
# What --format accepts: a format, or a text format with a codec extension (`jsonl.gz`).
FORMAT_NAMES = (*FORMATS, *(f"{f}{ext}" for f in STREAM_FORMATS for ext in CODEC_EXTENSIONS))


# URLs whose query and fragment are no part of the file's name: a signed URL's extension is before its `?`
# (`https://b.s3.amazonaws.com/a.jsonl?X-Amz-Signature=...`). Other schemes keep `?` in names (s3fs, local paths).
QUERY_SCHEMES = ("http://", "https://")


def url_path(name: str) -> str:
    """The name without the query and fragment of an http(s) URL; any other name as it is."""
    if name[:8].lower().startswith(QUERY_SCHEMES):
        return re.split(r"[?#]", name, maxsplit=1)[0]
    return name


def _lowered(name: str) -> str:
    """The name lower-cased, without an http(s) query, compound extensions spelled out ('a.tgz' -> 'a.tar.gz')."""
    lowered = url_path(name).lower()
    for short, long in COMPOUND_EXTENSIONS.items():
        if lowered.endswith(short):
            return lowered[: -len(short)] + long
    return lowered


def codec_of(name: str) -> str | None:
    """The codec a file name's last extension names ('a.jsonl.gz' -> 'gzip', 'a.tgz' -> 'gzip'), or None."""
    lowered = _lowered(name)
    return next((codec for ext, codec in CODEC_EXTENSIONS.items() if lowered.endswith(ext)), None)


def split_name(name: str) -> tuple[str | None, str | None]:
    """(format, codec) from a file name: 'a.jsonl.gz' -> ('jsonl', 'gzip'), 'a.csv' -> ('csv', None). (None, None)
    when the name is no input format, compressed parquet included.
    """
    codec = codec_of(name)
    lowered = _lowered(name)
    if codec is not None:
        lowered = lowered[: lowered.rfind(".")]
    fmt = next((f for ext, f in EXTENSIONS.items() if lowered.endswith(ext)), None)
    if fmt is None or (codec is not None and fmt not in STREAM_FORMATS):
        return None, None
    return fmt, codec


def resolve_format(name: str, fmt: str | None, compression: str | None) -> tuple[str | None, str | None]:
    """(format, codec or None) of one file. fmt (a FORMATS name) replaces the format its name says, but the name's
    codec extension still counts; compression (a COMPRESSIONS name) replaces the codec, 'none' meaning none.
    format None: not an input file.
    """
    named_format, named_codec = split_name(name)
    if fmt is not None:
        named_format, named_codec = fmt, codec_of(name)
    if compression is not None:
        named_codec = None if compression == NO_COMPRESSION else compression
    return named_format, named_codec


def strip_extensions(name: str) -> str:
    """A file name without its format and codec extensions: 'a/b.jsonl.gz' -> 'a/b'; a name without one as it is.
    An http(s) URL loses its query and fragment too."""
    name = url_path(name)
    base = name.rsplit("/", 1)[-1]
    if codec_of(base) is not None:
        base = base[: base.rfind(".")]
    if "." in base:
        base = base[: base.rfind(".")]
    return name[: len(name) - len(name.rsplit("/", 1)[-1])] + base
