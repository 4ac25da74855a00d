"""Turn a model reference (local folder, hub id, fsspec URI) into the loaded components of its model family.

Knows diffusers/transformers layouts; remote folders are localised by `auditor.io.model_store`
(fsspec only), so this module itself never touches object storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import ModelLoadError
from auditor.scoring import layout as layouts
from auditor.scoring.layout import FamilyLayout
from auditor.scoring.tokens import load_packed_tokenizer

# Resolving a model folder needs no torch: the pipeline's CPU stage does it for the tokenizer.
if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def text_dtype_kwarg() -> str:
    """transformers' from_pretrained keyword for the weights' dtype: 4.56 renamed torch_dtype to dtype (and warns on
    the old name); before, an unknown `dtype` lands in the model config and fails its repr (TypeError: Object of
    type dtype is not JSON serializable)."""
    major, minor = (int(part) for part in metadata.version("transformers").split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# What a scoring run needs from a hub snapshot, for every family's component folders; pickles are never fetched.
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    *(
        f"{folder}/{pattern}"
        for folder in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        for pattern in ("*.json", "*.safetensors")
    ),
    "tokenizer/*",
    "tokenizer_2/*",
    "tokenizer_3/*",
    "scheduler/*.json",
    "vae/config.json",
]


@dataclass
class ModelComponents:
    """What the score needs, already on its device and dtype.

    unet: the denoiser (a UNet, or a transformer for DiT families); tokenizer / text_encoder: the family's main
    ones; modules: every text encoder by folder (None where model_index.json records it as null);
    packed_tokenizer: all of the family's tokenizers (`auditor.scoring.tokens.PackedTokenizer`).
    """

    root: Path
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    family: str = "sd"
    modules: dict[str, torch.nn.Module | None] = field(default_factory=dict)
    packed_tokenizer: Any = None
    pipeline_config: dict[str, Any] = field(default_factory=dict)
    vae_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.packed_tokenizer is None:
            from auditor.scoring.tokens import PackedTokenizer

            self.packed_tokenizer = PackedTokenizer(
                [("tokenizer", self.tokenizer, self.tokenizer.model_max_length)]
            )
        if not self.modules:
            self.modules = {"text_encoder": self.text_encoder}


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


def check_model_dir(root: Path) -> FamilyLayout:
    """The folder's family layout, after naming what is missing and refusing pickle-only weights."""
    return layouts.check_model_dir(root)


def load_components(root: Path, device: torch.device, dtype: torch.dtype) -> ModelComponents:
    """Load the family's tokenizers, text encoders, denoiser and scheduler config from a checked local folder."""
    import diffusers
    import transformers

    layout = check_model_dir(root)
    transformers.utils.logging.disable_progress_bar()
    packed = load_packed_tokenizer(root, layout)
    present = set(layouts.present_components(root, layout))
    modules: dict[str, torch.nn.Module | None] = {}
    for name in layout.text_encoders:
        if name not in present:
            modules[name] = None
            continue
        text_config = json.loads((root / name / "config.json").read_text())
        architecture = (text_config.get("architectures") or ["CLIPTextModel"])[0]
        text_encoder_cls = getattr(transformers, architecture, transformers.CLIPTextModel)
        encoder, info = text_encoder_cls.from_pretrained(
            root / name, use_safetensors=True, output_loading_info=True, **{text_dtype_kwarg(): dtype}
        )
        load_unprefixed_text_weights(encoder, root / name, info)
        modules[name] = encoder.to(device=device).eval().requires_grad_(False)
    denoiser_config = json.loads((root / layout.denoiser / "config.json").read_text())
    denoiser_cls = getattr(diffusers, denoiser_config.get("_class_name", "UNet2DConditionModel"))
    denoiser = denoiser_cls.from_pretrained(root / layout.denoiser, use_safetensors=True, torch_dtype=dtype)
    denoiser.to(device=device).eval().requires_grad_(False)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    vae_config_path = root / "vae" / "config.json"
    vae_config = json.loads(vae_config_path.read_text()) if vae_config_path.is_file() else None
    main_encoder = modules[layout.text_encoders[0]]
    return ModelComponents(
        root,
        packed.main_tokenizer,
        main_encoder,
        denoiser,
        scheduler_config,
        family=layout.name,
        modules=modules,
        packed_tokenizer=packed,
        pipeline_config=layouts.read_model_index(root) or {},
        vae_config=vae_config,
    )


def load_unprefixed_text_weights(encoder: torch.nn.Module, folder: Path, info: dict[str, Any]) -> None:
    """Fill the weights `from_pretrained` left at their random init, or fail: never score with them.

    transformers 5 saves a CLIPTextModel without its `text_model.` prefix (the shipped SD toy's text encoder);
    transformers 4 looks for `text_model.<key>`, reports the file's keys as unexpected and the model's as missing.
    """
    missing = set(info.get("missing_keys") or ())
    if not missing:
        return
    unexpected = set(info.get("unexpected_keys") or ())
    prefix = "text_model."
    if missing == {prefix + key for key in unexpected}:
        from safetensors.torch import load_file

        files = sorted(folder.glob("*.safetensors"))
        state = {key: value for path in files for key, value in load_file(path).items() if key in unexpected}
        encoder.get_submodule(prefix.rstrip(".")).load_state_dict(state, strict=True)
        return
    raise ModelLoadError(
        f"{folder}: transformers left {len(missing)} weights of {type(encoder).__name__} uninitialised "
        f"({', '.join(sorted(missing)[:3])}, ...; the file has {len(unexpected)} it did not use). The folder was "
        "written for another transformers version or architecture: install the one that wrote it "
        "(its config.json's transformers_version)."
    )


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
