"""fsspec filesystems for local paths and URIs, JSON read/write, small path helpers. fsspec only, no torch/ray."""

from __future__ import annotations

import json
import logging
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from auditor.errors import ConfigError

# Every file written under a temporary name, then moved into place, starts with this. pyarrow.dataset, polars and
# Spark skip names starting with "_" or ".", and the ledger skips this prefix, so a half-written file is never read.
TEMPORARY_PREFIX = "_tmp-"

logger = logging.getLogger(__name__)

LOCAL_PROTOCOLS = ("file", "local")


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in LOCAL_PROTOCOLS for p in protocols)


def filesystem_for(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or fsspec URI. Storage options go to remote filesystems only."""
    protocol = fsspec.core.split_protocol(uri)[0]
    options = {} if protocol in (None, *LOCAL_PROTOCOLS) else dict(storage_options or {})
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"cannot open {uri!r}: {exc}. Check the URI scheme (s3://, gs://, file://)."
        ) from exc


def to_uri(fs: AbstractFileSystem, path: str) -> str:
    """A path as users write it: absolute local path, or protocol://bucket/key."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    fs, path = filesystem_for(uri, storage_options)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read().decode("utf-8"))


def write_json(fs: AbstractFileSystem, path: str, value: Any) -> None:
    """Write JSON to a temporary name, then move it into place, so readers never see half a file."""
    data = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")
    parent, _, name = path.rpartition("/")
    temporary = f"{parent}/{TEMPORARY_PREFIX}{name}"
    fs.makedirs(parent, exist_ok=True)
    with fs.open(temporary, "wb") as fh:
        fh.write(data)
    fs.mv(temporary, path)


def remove_tree(fs: AbstractFileSystem, path: str) -> None:
    if fs.exists(path):
        fs.rm(path, recursive=True)
