"""Which model family a diffusers folder holds, and what is on disk for it: read from `model_index.json`.

torch-free (json and paths only), so the pipeline's CPU stages can plan and tokenize without loading torch.
The model math of each family lives in `auditor.scoring.families`; this module only knows folder layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_INDEX = "model_index.json"


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
    index = read_model_index(root)
    if index is None:
        return SD
    class_name = str(index.get("_class_name", ""))
    if class_name in BY_PIPELINE:
        return BY_PIPELINE[class_name]
    if class_name in DISTILLED_PIPELINES or class_name.startswith("Flux"):
        raise ModelLoadError(
            f"model folder {root} is a {class_name}: a guidance-distilled model has no unconditional prediction to "
            f"subtract, so the text-conditional magnitude is undefined for it. Supported pipelines: "
            f"{supported_pipelines()}."
        )
    raise ModelLoadError(
        f"model folder {root} holds a {class_name or 'pipeline without _class_name'} (model_index.json), which "
        f"auditor cannot score. Supported pipelines: {supported_pipelines()}."
    )


def present_components(root: Path, layout: FamilyLayout) -> tuple[str, ...]:
    """The layout's components that this folder has; a component recorded as null in model_index.json is absent."""
    index = read_model_index(root) or {}
    present = []
    for name in layout.components:
        entry = index.get(name)
        recorded_null = isinstance(entry, list) and all(value is None for value in entry)
        if recorded_null and name in layout.optional:
            continue
        present.append(name)
    return tuple(present)


def check_model_dir(root: Path) -> FamilyLayout:
    """The folder's family, after checking every component it needs is there with safetensors weights."""
    layout = detect_layout(root)
    index = read_model_index(root) or {}
    for name in layout.components:
        entry = index.get(name)
        if isinstance(entry, list) and all(value is None for value in entry) and name not in layout.optional:
            raise ModelLoadError(
                f"model folder {root}: model_index.json records {name} as null, but a {layout.pipeline_classes[0]} "
                f"needs it to score. Save the pipeline with its {name}."
            )
    components = present_components(root, layout)
    missing = [name for name in components if not (root / name).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ModelLoadError(
            f"model folder {root} is missing {', '.join(missing)}; it has: {', '.join(present) or 'nothing'}. "
            f"A {layout.pipeline_classes[0]} folder in diffusers format needs "
            f"{', '.join(name + '/' for name in components)}."
        )
    for name in layout.weight_components:
        if name not in components:
            continue
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
    return layout
