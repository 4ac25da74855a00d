"""Copy a model folder from object storage to a local cache once: only the files the caller selects. fsspec only."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from auditor.errors import ModelLoadError
from auditor.redact import redact_uri

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".auditor-complete"


def model_cache_dir() -> Path:
    return Path(os.environ.get("AUDITOR_CACHE", Path.home() / ".cache" / "auditor")) / "models"


# select(listing, read) -> the relative paths to copy: listing holds the folder's files as relative POSIX paths,
# read(relative path) returns one file's bytes (for model_index.json).
Selector = Callable[[Collection[str], Callable[[str], bytes]], Sequence[str]]


def localize_model_dir(
    uri: str, storage_options: dict[str, Any], select: Selector | None = None, tag: str | None = None
) -> Path:
    """Local copy of the folder at `uri`, fetched on first use; a marker file makes a half copy refetch.

    select: which files to copy (None: all); tag: a name for the selection when it is not the default one (a
    weights variant), so copies of different selections never mix.
    """
    import fsspec

    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    target = model_cache_dir() / (f"{key}-{tag}" if tag else key)
    if (target / COMPLETE_MARKER).exists():
        return target
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        if not fs.isdir(path):
            raise ModelLoadError(f"model URI {uri} is not a folder (or does not exist) on {fs.protocol}.")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        base = path.rstrip("/")
        listing = [found[len(base) + 1 :] for found in fs.find(base) if found.startswith(base + "/")]
        wanted = list(select(listing, lambda rel: fs.cat_file(f"{base}/{rel}")) if select else listing)
        logger.info(
            "copying %d of %d files of model %s to %s", len(wanted), len(listing), redact_uri(uri), target
        )
        for relative in wanted:
            (partial / relative).parent.mkdir(parents=True, exist_ok=True)
        fs.get([f"{base}/{rel}" for rel in wanted], [str(partial / rel) for rel in wanted])
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not copy model from {uri} ({type(exc).__name__}: {exc}). Check the URI, the endpoint "
            "(--storage-option endpoint_url=...) and credentials in the environment."
        ) from exc
    (partial / COMPLETE_MARKER).write_text(redact_uri(uri))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
