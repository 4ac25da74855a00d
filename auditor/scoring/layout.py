"""Which model family a diffusers folder holds, and what is on disk for it: read from `model_index.json`.

torch-free (json and paths only), so the pipeline's CPU stages can plan and tokenize without loading torch.
The model math of each family lives in `auditor.scoring.families`; this module only knows folder layouts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auditor.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_INDEX = "model_index.json"
# The weight file name each loader looks for (diffusers' ModelMixin, transformers' PreTrainedModel), before
# `_add_variant` puts ".<variant>" in front of the extension.
DENOISER_WEIGHTS = "diffusion_pytorch_model"
ENCODER_WEIGHTS = "model"
VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
# What the families read beside the weights: the scheduler's config (timesteps, prediction type) and the VAE's
# (block_out_channels sets the latent-to-pixel factor, `ScoreFamily.vae_scale_factor`); never the VAE weights.
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
VAE_CONFIG = "vae/config.json"


@dataclass(frozen=True)
class TokenizerSlot:
    """One tokenizer of a family, in the order its ids are packed side by side into one (B, L_total) matrix.

    max_length None: the tokenizer's own `model_max_length`; length_from: take `model_max_length` from this other
    tokenizer folder instead (SD3 pads both CLIPs to `tokenizer`'s length, `self.tokenizer_max_length`).
    """

    folder: str
    max_length: int | None = None
    length_from: str | None = None


@dataclass(frozen=True)
class FamilyLayout:
    """The folders a family's pipeline needs, and how its captions are tokenized (`auditor.scoring.tokens`).

    main_tokenizer: the slot whose token counts give `n_tokens` / `truncated` (the text the denoiser attends to
    first: CLIP for SD/SDXL/SD3, T5 for PixArt). optional: folders that `model_index.json` may record as null
    (SD3 without T5); such a slot then contributes no ids.
    """

    name: str
    pipeline_classes: tuple[str, ...]
    denoiser: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[TokenizerSlot, ...]
    main_tokenizer: int = 0
    optional: tuple[str, ...] = ()

    @property
    def weight_components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        return (*self.weight_components, *(slot.folder for slot in self.tokenizers), "scheduler")


SD = FamilyLayout(
    name="sd",
    pipeline_classes=("StableDiffusionPipeline",),
    denoiser="unet",
    text_encoders=("text_encoder",),
    tokenizers=(TokenizerSlot("tokenizer"),),
)
SDXL = FamilyLayout(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline",),
    denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=(TokenizerSlot("tokenizer"), TokenizerSlot("tokenizer_2")),
)
SD3 = FamilyLayout(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline",),
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tokenizers=(
        TokenizerSlot("tokenizer"),
        TokenizerSlot("tokenizer_2", length_from="tokenizer"),
        # encode_prompt's max_sequence_length default.
        TokenizerSlot("tokenizer_3", max_length=256),
    ),
    optional=("text_encoder_3", "tokenizer_3"),
)
PIXART_SIGMA = FamilyLayout(
    name="pixart-sigma",
    pipeline_classes=("PixArtSigmaPipeline",),
    denoiser="transformer",
    text_encoders=("text_encoder",),
    # PixArtSigmaPipeline.__call__'s max_sequence_length default.
    tokenizers=(TokenizerSlot("tokenizer", max_length=300),),
)
PIXART_ALPHA = FamilyLayout(
    name="pixart-alpha",
    pipeline_classes=("PixArtAlphaPipeline",),
    denoiser="transformer",
    text_encoders=("text_encoder",),
    tokenizers=(TokenizerSlot("tokenizer", max_length=120),),
)
LAYOUTS = (SD, SDXL, SD3, PIXART_SIGMA, PIXART_ALPHA)
BY_PIPELINE = {cls: layout for layout in LAYOUTS for cls in layout.pipeline_classes}
BY_NAME = {layout.name: layout for layout in LAYOUTS}
# Guidance-distilled pipelines: the model takes the guidance scale as an input and has no unconditional
# prediction to subtract, so the paper's text-conditional magnitude is undefined for them.
DISTILLED_PIPELINES = ("FluxPipeline", "FluxKontextPipeline", "Flux2Pipeline", "FluxFillPipeline")


def supported_pipelines() -> str:
    return ", ".join(sorted(BY_PIPELINE))


@dataclass(frozen=True)
class ModelFiles:
    """What scoring reads from a model folder for one weights variant, as paths relative to the folder.

    variant: the variant asked for or detected (None: the default weights, `model.safetensors`); weights: the
    variant each weight component loads (None: its default weights, where it has no file of `variant`);
    files: sorted relative POSIX paths of every file the loaders open (configs, weights, shards and their index,
    tokenizer files, scheduler and VAE configs): what is fingerprinted, fetched from a hub or copied from storage.
    """

    layout: FamilyLayout
    variant: str | None
    weights: dict[str, str | None] = field(default_factory=dict)
    files: tuple[str, ...] = ()


def _weight_files(names: Collection[str], stem: str) -> dict[str | None, list[str]]:
    """{variant: its weight files} among a component folder's file `names`: single files, shards and the index.

    `model.safetensors` is variant None, `model.fp16.safetensors` "fp16", `model.fp16-00001-of-00002.safetensors` a
    shard of "fp16", `model.safetensors.index.fp16.json` its index (transformers' and diffusers' `_add_variant`).
    """
    single = re.compile(rf"^{re.escape(stem)}(?:\.([A-Za-z0-9_]+))?\.safetensors$")
    shard = re.compile(rf"^{re.escape(stem)}(?:\.([A-Za-z0-9_]+))?-\d+-of-\d+\.safetensors$")
    index = re.compile(rf"^{re.escape(stem)}\.safetensors\.index(?:\.([A-Za-z0-9_]+))?\.json$")
    found: dict[str | None, list[str]] = {}
    for name in sorted(names):
        for pattern in (single, shard, index):
            match = pattern.match(name)
            if match:
                found.setdefault(match.group(1), []).append(name)
                break
    return found


def _variant_names(variants: Collection[str | None]) -> str:
    return ", ".join(sorted("(default)" if v is None else v for v in variants)) or "none"


def layout_from_index(index: dict[str, Any] | None, where: str) -> FamilyLayout:
    """The family recorded in a `model_index.json` (None: no such file, SD 1.x/2.x); `where` names the folder."""
    if index is None:
        return SD
    class_name = str(index.get("_class_name", ""))
    if class_name in BY_PIPELINE:
        return BY_PIPELINE[class_name]
    if class_name in DISTILLED_PIPELINES or class_name.startswith("Flux"):
        raise ModelLoadError(
            f"model folder {where} is a {class_name}: a guidance-distilled model has no unconditional prediction to "
            f"subtract, so the text-conditional magnitude is undefined for it. Supported pipelines: "
            f"{supported_pipelines()}."
        )
    raise ModelLoadError(
        f"model folder {where} holds a {class_name or 'pipeline without _class_name'} (model_index.json), which "
        f"auditor cannot score. Supported pipelines: {supported_pipelines()}."
    )


def select_model_files(
    listing: Collection[str], index: dict[str, Any] | None, variant: str | None, where: str
) -> ModelFiles:
    """The files scoring reads, chosen from `listing` (relative POSIX paths of a folder's files: local, in object
    storage or on a hub) for `variant`; raises ModelLoadError naming what is missing and the fix.

    variant None picks the default weights where every weight component has them, else the one variant that
    every component lacking them has (an fp16-only folder loads as "fp16"). A given variant loads where a
    component has it and falls back to the component's default weights where not (as diffusers'
    `DiffusionPipeline.from_pretrained(variant=...)` does).
    """
    if variant is not None and not VARIANT_PATTERN.match(variant):
        raise ModelLoadError(
            f"--variant {variant!r} is not a weights variant name; use what the file names hold, e.g. fp16 for "
            "diffusion_pytorch_model.fp16.safetensors."
        )
    layout = layout_from_index(index, where)
    index = index or {}
    by_folder: dict[str, list[str]] = {}
    for path in listing:
        folder, _, name = path.partition("/")
        if name and "/" not in name:
            by_folder.setdefault(folder, []).append(name)
    for name in layout.components:
        entry = index.get(name)
        if isinstance(entry, list) and all(value is None for value in entry) and name not in layout.optional:
            raise ModelLoadError(
                f"model folder {where}: model_index.json records {name} as null, but a {layout.pipeline_classes[0]} "
                f"needs it to score. Save the pipeline with its {name}."
            )
    components = _present(index, layout)
    missing = [name for name in components if name not in by_folder]
    if missing:
        present = sorted(by_folder)
        raise ModelLoadError(
            f"model folder {where} is missing {', '.join(missing)}; it has: {', '.join(present) or 'nothing'}. "
            f"A {layout.pipeline_classes[0]} folder in diffusers format needs "
            f"{', '.join(name + '/' for name in components)}."
        )
    weights = {
        name: _weight_files(by_folder[name], DENOISER_WEIGHTS if name == layout.denoiser else ENCODER_WEIGHTS)
        for name in layout.weight_components
        if name in components
    }
    for name, found in weights.items():
        if found:
            continue
        files = by_folder[name]
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelLoadError(
                f"{where}/{name} has only pickle weights ({', '.join(sorted(pickles))}); auditor loads safetensors "
                "only, since unpickling runs arbitrary code. Convert once with "
                "`save_pretrained(..., safe_serialization=True)`."
            )
        stem = DENOISER_WEIGHTS if name == layout.denoiser else ENCODER_WEIGHTS
        raise ModelLoadError(
            f"{where}/{name} has no *.safetensors weights that auditor can load (it looks for {stem}.safetensors, "
            f"{stem}.<variant>.safetensors or their shards); found: {', '.join(sorted(files)) or 'nothing'}. "
            "Save the component with save_pretrained(..., safe_serialization=True)."
        )
    chosen = variant if variant is not None else _detect_variant(weights, where)
    loads: dict[str, str | None] = {}
    for name, found in weights.items():
        if chosen in found:
            loads[name] = chosen
        elif None in found:
            loads[name] = None
        else:
            raise ModelLoadError(
                f"{where}/{name} has no {chosen} weights and no default ones; its variants: "
                f"{_variant_names(found)}. Pass --variant with one of them, or leave --variant out."
            )
    if variant is not None and variant not in loads.values():
        raise ModelLoadError(
            f"--variant {variant}: no component of {where} has {variant} weights; variants there: "
            + "; ".join(f"{name}: {_variant_names(found)}" for name, found in weights.items())
            + ". Pass one of them, or leave --variant out for the default weights."
        )
    selected = [MODEL_INDEX] if MODEL_INDEX in listing else []
    for name, found in weights.items():
        selected += [f"{name}/config.json", *(f"{name}/{f}" for f in found[loads[name]])]
    for slot in layout.tokenizers:
        if slot.folder in components:
            selected += [f"{slot.folder}/{f}" for f in by_folder[slot.folder]]
    selected += [path for path in (SCHEDULER_CONFIG, VAE_CONFIG) if path in listing]
    return ModelFiles(layout, chosen, loads, tuple(sorted(set(selected))))


def _detect_variant(weights: dict[str, dict[str | None, list[str]]], where: str) -> str | None:
    lacking = {name: found for name, found in weights.items() if None not in found}
    if not lacking:
        return None
    common = set.intersection(*(set(found) for found in lacking.values()))
    if len(common) == 1:
        return common.pop()
    shown = "; ".join(f"{name}: {_variant_names(found)}" for name, found in weights.items())
    fix = f"Pass --variant {' or '.join(sorted(common))}" if common else "Save every component in one variant"
    raise ModelLoadError(
        f"model folder {where} has no default weights in {', '.join(lacking)} and no single variant to load "
        f"instead (variants: {shown}). {fix}."
    )


def vae_variant(root: Path, variant: str | None) -> str | None:
    """The variant to load `root`/vae with (only for images, never for scores): `variant` where the VAE has it, its
    default weights where it has those, else its only variant; raises ModelLoadError when it has no weights (a hub
    or s3:// model is fetched without them)."""
    folder = root / "vae"
    found = _weight_files([p.name for p in folder.iterdir()] if folder.is_dir() else [], DENOISER_WEIGHTS)
    for candidate in (variant, None):
        if candidate in found:
            return candidate
    if len(found) == 1:
        return next(iter(found))
    raise ModelLoadError(
        f"{folder} has no VAE weights{f' of variant {variant}' if variant else ''} to decode images with (variants: "
        f"{_variant_names(found)}); scoring never reads them, so a hub or s3:// model is fetched without them. "
        "Pass a local copy of the full model folder."
    )


def list_model_folder(root: Path) -> list[str]:
    """Relative POSIX paths of the files at `root` and one folder below: all a diffusers layout uses, without
    walking whatever else a cloned repository holds."""
    listing = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_file():
                listing.append(entry.name)
            elif entry.is_dir() and not entry.name.startswith("."):
                with os.scandir(entry.path) as inner:
                    listing += [f"{entry.name}/{e.name}" for e in inner if e.is_file()]
    return listing


def model_files(root: Path, variant: str | None = None) -> ModelFiles:
    """`select_model_files` for the local folder `root`."""
    if not root.is_dir():
        raise ModelLoadError(f"model folder {root} does not exist or is not a folder.")
    return select_model_files(list_model_folder(root), read_model_index(root), variant, str(root))


def read_model_index(root: Path) -> dict[str, Any] | None:
    path = root / MODEL_INDEX
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{path} is not valid JSON ({exc}); re-save the model with save_pretrained."
        ) from exc


def detect_layout(root: Path) -> FamilyLayout:
    """The family of the folder at `root`, from `model_index.json`'s `_class_name`.

    A folder without `model_index.json` is taken as SD 1.x/2.x (unet/, text_encoder/, tokenizer/, scheduler/), as
    before families existed.
    """
    return layout_from_index(read_model_index(root), str(root))


def present_components(root: Path, layout: FamilyLayout) -> tuple[str, ...]:
    """The layout's components that this folder has; a component recorded as null in model_index.json is absent."""
    return _present(read_model_index(root) or {}, layout)


def _present(index: dict[str, Any], layout: FamilyLayout) -> tuple[str, ...]:
    present = []
    for name in layout.components:
        entry = index.get(name)
        recorded_null = isinstance(entry, list) and all(value is None for value in entry)
        if recorded_null and name in layout.optional:
            continue
        present.append(name)
    return tuple(present)


def check_model_dir(root: Path, variant: str | None = None) -> FamilyLayout:
    """The folder's family, after checking every component it needs is there with safetensors weights."""
    return model_files(root, variant).layout
