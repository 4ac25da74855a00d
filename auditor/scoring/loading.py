"""Turn a model reference (local folder, hub id, fsspec URI) into loaded SD components.

Knows diffusers/transformers layouts; remote folders are localised by `auditor.io.model_store`
(fsspec only), so this module itself never touches object storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import ModelLoadError

if (
    TYPE_CHECKING
):  # resolving a model folder needs no torch: the pipeline's CPU stage does it for the tokenizer
    import torch

logger = logging.getLogger(__name__)

REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "text_encoder")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What a scoring run needs from a hub snapshot; pickles are never fetched.
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "unet/*.json",
    "unet/*.safetensors",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "tokenizer/*",
    "scheduler/*.json",
]


@dataclass
class ModelComponents:
    """The four pieces the score needs, already on their device and dtype."""

    root: Path
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]


def is_remote_uri(model: str) -> bool:
    return "://" in model and not model.startswith("file://")


def resolve_model_dir(model: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Path:
    """Local folder for `model`: a folder as is, an fsspec URI copied once to the local cache, or a hub id."""
    text = os.fspath(model)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_remote_uri(text):
        from auditor.io.model_store import localize_model_dir

        return localize_model_dir(text, storage_options or {})
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(
            f"model {text!r} is a file; pass the diffusers folder that holds unet/, text_encoder/, ..."
        )
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download_from_hub(text)
    raise ModelLoadError(
        f"model {text!r} is neither a local folder, an fsspec URI (s3://bucket/path) nor a hub id (owner/name)."
    )


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # the hub client raises many unrelated types for "offline" and "not found"
        raise ModelLoadError(
            f"could not fetch hub model {repo_id!r} ({type(exc).__name__}: {exc}). "
            "Without network access, download the diffusers folder elsewhere and pass its local path or s3:// URI."
        ) from exc


def check_model_dir(root: Path) -> None:
    """Fail with a message naming what is missing, and refuse pickle-only weights."""
    missing = [name for name in REQUIRED_COMPONENTS if not (root / name).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ModelLoadError(
            f"model folder {root} is missing {', '.join(missing)}; it has: {', '.join(present) or 'nothing'}. "
            "A Stable Diffusion folder in diffusers format needs unet/, text_encoder/, tokenizer/ and scheduler/."
        )
    for name in WEIGHT_COMPONENTS:
        folder = root / name
        files = [p.name for p in folder.iterdir()]
        if any(f.endswith(".safetensors") for f in files):
            continue
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelLoadError(
                f"{folder} has only pickle weights ({', '.join(sorted(pickles))}); auditor loads safetensors only, "
                "since unpickling runs arbitrary code. Convert once with `save_pretrained(..., safe_serialization=True)`."
            )
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights; found: {', '.join(sorted(files)) or 'nothing'}."
        )


def load_components(root: Path, device: torch.device, dtype: torch.dtype) -> ModelComponents:
    """Load tokenizer, text encoder, UNet and scheduler config from a checked local folder."""
    import transformers
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer

    check_model_dir(root)
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    text_config = json.loads((root / "text_encoder" / "config.json").read_text())
    architecture = (text_config.get("architectures") or ["CLIPTextModel"])[0]
    text_encoder_cls = getattr(transformers, architecture, transformers.CLIPTextModel)
    text_encoder = text_encoder_cls.from_pretrained(root / "text_encoder", use_safetensors=True, dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True, torch_dtype=dtype)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    text_encoder.to(device=device).eval().requires_grad_(False)
    unet.to(device=device).eval().requires_grad_(False)
    return ModelComponents(root, tokenizer, text_encoder, unet, scheduler_config)


def fingerprint_model(root: Path) -> str:
    """sha256 over every component's configs and safetensors bytes: equal fingerprints, equal scores."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt"):
            digest.update(str(path.relative_to(root)).encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
