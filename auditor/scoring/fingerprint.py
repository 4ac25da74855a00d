"""The model fingerprint: a sha256 over exactly the files that determine scores, with per-file digests cached.

hashlib, json and paths only (no torch): the audit driver fingerprints a model before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from auditor.scoring.layout import model_files

logger = logging.getLogger(__name__)

# Bumped when the definition changes; part of what is hashed, so two definitions never give one value.
FINGERPRINT_VERSION = "auditor-model-fingerprint/2"
# What the first definition (auditor <= 0.x, before model variants) hashed: every such file under the folder.
LEGACY_SUFFIXES = (".json", ".safetensors", ".txt")
CHUNK_BYTES = 1 << 20
# A file changed less than this long ago is hashed but not cached: the kernel stamps times from a coarse clock
# (a few ms), so a rewrite within one tick could keep size, mtime and ctime (git's "racily clean" entries).
RACY_S = 2.0


def digest_cache_dir() -> Path:
    """Where per-file digests are kept: $AUDITOR_CACHE/digests, else ~/.cache/auditor/digests (next to the model
    copies of `auditor.io.model_store`)."""
    return Path(os.environ.get("AUDITOR_CACHE", Path.home() / ".cache" / "auditor")) / "digests"


def _identity(path: Path) -> tuple[str, bool]:
    """(a file's identity, whether it may be cached): absolute path, device, inode, size and both nanosecond times.
    Rewriting a file in place changes its mtime and ctime; a copy or a replace changes its inode."""
    stat = path.stat()
    settled = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_S * 1e9
    return "\0".join(
        str(part)
        for part in (
            path.resolve(),
            stat.st_dev,
            stat.st_ino,
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ctime_ns,
        )
    ), settled


def _cache_path(key_text: str) -> Path:
    key = hashlib.sha256(key_text.encode()).hexdigest()
    return digest_cache_dir() / key[:2] / key


def _read_cached(key_text: str) -> str | None:
    try:
        value = _cache_path(key_text).read_text().strip()
    except OSError:
        return None
    return value if len(value) == 64 else None


def _write_cached(key_text: str, value: str) -> None:
    """Atomic (a temporary file renamed over the entry), so concurrent audit starts never read half an entry; a
    cache that cannot be written only costs the next start a rehash."""
    path = _cache_path(key_text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("cannot write the digest cache %s (%s); the next start hashes again", path, exc)


def _hash_file(path: Path, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    digest = digest or hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, read once per file identity (`_identity`) and then from the cache."""
    identity, settled = _identity(path)
    key = "file\0" + identity
    cached = _read_cached(key) if settled else None
    if cached is not None:
        return cached
    value = _hash_file(path).hexdigest()
    if settled:
        _write_cached(key, value)
    return value


def fingerprint_model(root: Path, variant: str | None = None) -> str:
    """sha256 over what determines scores: the relative path and sha256 of every file `model_files` selects for
    `variant` (denoiser and text-encoder weights and configs, tokenizer files, scheduler config, VAE config,
    model_index.json). VAE weights, safety checker, feature extractor, other variants, pickles, root checkpoints
    and README-like files are not read. Equal fingerprints, equal scores."""
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\n")
    for relative in model_files(root, variant).files:
        digest.update(f"{relative}\0{file_digest(root / relative)}\n".encode())
    return digest.hexdigest()


def legacy_paths(root: Path) -> list[Path]:
    """What the first definition hashed: every .json/.safetensors/.txt under `root`, sorted."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in LEGACY_SUFFIXES]


def legacy_digest(root: Path, paths: list[Path] | None = None) -> str:
    """The first definition computed from the bytes, uncached (as every audit start computed it then)."""
    digest = hashlib.sha256()
    for path in legacy_paths(root) if paths is None else paths:
        digest.update(str(path.relative_to(root)).encode())
        _hash_file(path, digest)
    return digest.hexdigest()


def legacy_fingerprint(root: Path) -> str:
    """The first definition: sha256 of every .json/.safetensors/.txt under `root`, path then bytes, in sorted
    order. Audits recorded it as their model fingerprint; it is computed to recognise their ledger records and
    threshold files, once per state of the folder (then cached by the identities of those files)."""
    paths = legacy_paths(root)
    identities = [_identity(p) for p in paths]
    key = "legacy\0" + json.dumps([identity for identity, _ in identities])
    settled = all(ok for _, ok in identities)
    cached = _read_cached(key) if settled else None
    if cached is not None:
        return cached
    value = legacy_digest(root, paths)
    if settled:
        _write_cached(key, value)
    return value
