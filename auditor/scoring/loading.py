"""Turn a model reference (local folder, hub id, fsspec URI) into the loaded components of its model family.

Knows diffusers/transformers layouts; remote folders are localised by `auditor.io.model_store`
(fsspec only), so this module itself never touches object storage.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import ModelLoadError
from auditor.scoring import layout as layouts
from auditor.scoring.fingerprint import fingerprint_model, legacy_fingerprint  # noqa: F401 (re-exported)
from auditor.scoring.layout import FamilyLayout, ModelFiles
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


@dataclass
class ModelComponents:
    """What the score needs, already on its device and dtype.

    unet: the denoiser (a UNet, or a transformer for DiT families); tokenizer / text_encoder: the family's main
    ones; modules: every text encoder by folder (None where model_index.json records it as null);
    packed_tokenizer: all of the family's tokenizers (`auditor.scoring.tokens.PackedTokenizer`); variant: the
    weights variant loaded (None: the default weights; `auditor.scoring.layout.ModelFiles`).
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
    variant: str | None = None

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


def resolve_model_dir(
    model: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, variant: str | None = None
) -> Path:
    """Local folder for `model`: a folder as is, an fsspec URI copied once to the local cache, or a hub id. A copy
    or download holds only what scoring loads for `variant` (`auditor.scoring.layout.select_model_files`)."""
    text = os.fspath(model)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_remote_uri(text):
        from auditor.io.model_store import localize_model_dir

        def select(listing: Collection[str], read: Callable[[str], bytes]) -> list[str]:
            index = json.loads(read(layouts.MODEL_INDEX)) if layouts.MODEL_INDEX in listing else None
            return list(layouts.select_model_files(listing, index, variant, text).files)

        return localize_model_dir(text, storage_options or {}, select, variant)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(
            f"model {text!r} is a file; pass the diffusers folder that holds unet/, text_encoder/, ..."
        )
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download_from_hub(text, variant)
    raise ModelLoadError(
        f"model {text!r} is neither a local folder, an fsspec URI (s3://bucket/path) nor a hub id (owner/name)."
    )


def hub_allow_patterns(repo_id: str, variant: str | None = None) -> list[str]:
    """The files of hub repository `repo_id` that scoring loads for `variant`: the snapshot's allow_patterns. Other
    variants, non-EMA and pickle weights, VAE weights, safety checker and root checkpoints are never fetched."""
    from huggingface_hub import HfApi, hf_hub_download

    listing = HfApi().list_repo_files(repo_id)
    index = None
    if layouts.MODEL_INDEX in listing:
        index = json.loads(Path(hf_hub_download(repo_id, layouts.MODEL_INDEX)).read_text())
    return list(layouts.select_model_files(listing, index, variant, f"hub model {repo_id}").files)


def _download_from_hub(repo_id: str, variant: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        try:
            patterns = hub_allow_patterns(repo_id, variant)
        except ModelLoadError:
            raise
        except Exception:  # offline or unreachable: a snapshot already in the hub cache still serves
            return Path(snapshot_download(repo_id, local_files_only=True))
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except ModelLoadError:
        raise
    except Exception as exc:  # the hub client raises many unrelated types for "offline" and "not found"
        raise ModelLoadError(
            f"could not fetch hub model {repo_id!r} ({type(exc).__name__}: {exc}). "
            "Without network access, download the diffusers folder elsewhere and pass its local path or s3:// URI."
        ) from exc


def check_model_dir(root: Path, variant: str | None = None) -> FamilyLayout:
    """The folder's family layout, after naming what is missing and refusing pickle-only weights."""
    return layouts.check_model_dir(root, variant)


def model_files(root: Path, variant: str | None = None) -> ModelFiles:
    """What scoring loads from the local folder `root` for `variant` (None: detected), and its family."""
    return layouts.model_files(root, variant)


def load_components(
    root: Path, device: torch.device, dtype: torch.dtype, variant: str | None = None
) -> ModelComponents:
    """Load the family's tokenizers, text encoders, denoiser and scheduler config from a checked local folder, the
    weights of `variant` (None: the default weights, or the only variant a folder has)."""
    import diffusers
    import transformers

    files = model_files(root, variant)
    layout = files.layout
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
            root / name, use_safetensors=True, output_loading_info=True, variant=files.weights[name],
            **{text_dtype_kwarg(): dtype},
        )  # fmt: skip
        weight_files = [
            root / f for f in files.files if f.startswith(f"{name}/") and f.endswith(".safetensors")
        ]
        load_unprefixed_text_weights(encoder, root / name, info, weight_files)
        modules[name] = encoder.to(device=device).eval().requires_grad_(False)
    denoiser_config = json.loads((root / layout.denoiser / "config.json").read_text())
    denoiser_cls = getattr(diffusers, denoiser_config.get("_class_name", "UNet2DConditionModel"))
    denoiser = denoiser_cls.from_pretrained(
        root / layout.denoiser,
        use_safetensors=True,
        torch_dtype=dtype,
        variant=files.weights[layout.denoiser],
    )
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
        variant=files.variant,
    )


def load_unprefixed_text_weights(
    encoder: torch.nn.Module, folder: Path, info: dict[str, Any], weight_files: Sequence[Path] | None = None
) -> None:
    """Fill the weights `from_pretrained` left at their random init, or fail: never score with them. weight_files:
    the safetensors files of the loaded variant (None: every one in `folder`).

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

        files = sorted(weight_files) if weight_files is not None else sorted(folder.glob("*.safetensors"))
        state = {key: value for path in files for key, value in load_file(path).items() if key in unexpected}
        encoder.get_submodule(prefix.rstrip(".")).load_state_dict(state, strict=True)
        # transformers has just printed "newly initialized ... You should probably TRAIN this model": say it is handled.
        logger.info(
            "%s: loaded %d weights saved without the `%s` prefix (a newer transformers wrote them); "
            "transformers' 'newly initialized' warning above is resolved",
            folder,
            len(state),
            prefix,
        )
        return
    raise ModelLoadError(
        f"{folder}: transformers left {len(missing)} weights of {type(encoder).__name__} uninitialised "
        f"({', '.join(sorted(missing)[:3])}, ...; the file has {len(unexpected)} it did not use). The folder was "
        "written for another transformers version or architecture: install the one that wrote it "
        "(its config.json's transformers_version)."
    )
