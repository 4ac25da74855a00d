"""What a toy model was trained on: memorized captions (with trigger word and latent), seen-once and held-out.

Stored next to the model as `toy_manifest.json` + `toy_latents.safetensors`; other modules' tests read it through
`load_manifest`. Imports torch and safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from auditor.errors import InputDataError

MANIFEST_FILE = "toy_manifest.json"
LATENTS_FILE = "toy_latents.safetensors"
MANIFEST_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ToyManifest:
    """The labelled captions of one toy model.

    memorized[i] contains the made-up word triggers[i] (a single token, trigger_tokens[i] as the tokenizer spells
    it, e.g. 'zorvex</w>'); memorized_latents[i] (C, H, W) float32 is the one latent it was trained on, repeated
    memorized_repeats[i] times. seen_once: non-memorized captions that were each in exactly one training sample
    (seen_once_latents (K, C, H, W) holds that sample's latent). held_out: captions of the same template never seen
    in training. memorized_latent_index[i] = i: the row of memorized_latents for memorized[i].
    """

    memorized: list[str]
    triggers: list[str]
    trigger_tokens: list[str]
    memorized_latents: torch.Tensor
    memorized_latent_index: list[int]
    memorized_repeats: list[int]
    seen_once: list[str]
    seen_once_latents: torch.Tensor
    held_out: list[str]
    settings: dict[str, Any] = field(default_factory=dict)


def save_manifest(model_dir: str | Path, manifest: ToyManifest) -> None:
    model_dir = Path(model_dir)
    payload = {
        "version": MANIFEST_VERSION,
        "memorized": [
            {"caption": c, "trigger": t, "trigger_token": tok, "latent_index": i, "repeats": r}
            for c, t, tok, i, r in zip(
                manifest.memorized,
                manifest.triggers,
                manifest.trigger_tokens,
                manifest.memorized_latent_index,
                manifest.memorized_repeats,
                strict=True,
            )
        ],
        "seen_once": manifest.seen_once,
        "held_out": manifest.held_out,
        "settings": manifest.settings,
    }
    save_file(
        {
            "memorized": manifest.memorized_latents.float().contiguous(),
            "seen_once": manifest.seen_once_latents.float().contiguous(),
        },
        model_dir / LATENTS_FILE,
    )
    (model_dir / MANIFEST_FILE).write_text(
        json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8"
    )


def load_manifest(model_dir: str | Path) -> ToyManifest:
    """Read the manifest of a toy model folder built by `auditor toy-model build`."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise InputDataError(
            f"{path} not found: {model_dir} is not a toy model folder. Build one with `auditor toy-model build DIR`."
        )
    payload = json.loads(path.read_text(encoding="utf-8"))
    latents = load_file(model_dir / LATENTS_FILE)
    rows = payload["memorized"]
    return ToyManifest(
        memorized=[row["caption"] for row in rows],
        triggers=[row["trigger"] for row in rows],
        trigger_tokens=[row["trigger_token"] for row in rows],
        memorized_latents=latents["memorized"],
        memorized_latent_index=[int(row["latent_index"]) for row in rows],
        memorized_repeats=[int(row["repeats"]) for row in rows],
        seen_once=list(payload["seen_once"]),
        seen_once_latents=latents["seen_once"],
        held_out=list(payload["held_out"]),
        settings=dict(payload.get("settings", {})),
    )
