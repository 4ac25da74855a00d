"""Copy a model folder from object storage to a local cache once. fsspec only."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from auditor.errors import ModelLoadError
from auditor.redact import redact_uri

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".auditor-complete"


def model_cache_dir() -> Path:
    return Path(os.environ.get("AUDITOR_CACHE", Path.home() / ".cache" / "auditor")) / "models"


def localize_model_dir(uri: str, storage_options: dict[str, Any]) -> Path:
    """Local copy of the folder at `uri`, fetched on first use; a marker file makes a half copy refetch."""
    import fsspec

    target = model_cache_dir() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    if (target / COMPLETE_MARKER).exists():
        return target
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        if not fs.isdir(path):
            raise ModelLoadError(f"model URI {uri} is not a folder (or does not exist) on {fs.protocol}.")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        logger.info("copying model %s to %s", redact_uri(uri), target)
        fs.get(path.rstrip("/") + "/", str(partial) + "/", recursive=True)
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
