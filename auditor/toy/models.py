"""Build Stable Diffusion folders (diffusers layout, safetensors) from configs, with random or given weights.

Sizes are presets, not assumptions: the scorer reads every shape from the saved configs.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from auditor.toy import words
from auditor.toy.tokenizer import build_clip_tokenizer

# The SD v1 scheduler config (scaled_linear 0.00085-0.012, 1000 steps, steps_offset 1): t1 = 981 under DDIM-50.
SD_V1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


@dataclass(frozen=True, kw_only=True)
class TinySDSpec:
    """Shapes of a small SD model; every field maps to a diffusers/transformers config field."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    sample_size: int = 16
    latent_channels: int = 4
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    vocab_size: int = 1024
    model_max_length: int = 77
    prediction_type: str = "epsilon"
    norm_num_groups: int = 8


TINY = TinySDSpec()
# "Small SD-shaped" benchmark model: SD's block pattern at a 32x32 latent, real 77-token text.
SMALL = TinySDSpec(
    block_out_channels=(64, 128, 256, 256),
    layers_per_block=1,
    sample_size=32,
    cross_attention_dim=256,
    attention_head_dim=8,
    text_layers=4,
    text_heads=4,
    text_intermediate=512,
    norm_num_groups=32,
)
# Stable Diffusion v1.5 shapes (UNet ~860M parameters, CLIP ViT-L/14-sized text encoder): for GPU throughput,
# which does not depend on the weights' values. Only the vocabulary is smaller (it changes no FLOPs).
SD15 = TinySDSpec(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    text_layers=12,
    text_heads=12,
    text_intermediate=3072,
    norm_num_groups=32,
)
# The smallest model that still runs every code path: for memory-vs-corpus-size runs, where speed is not measured.
MICRO = TinySDSpec(
    block_out_channels=(8, 16),
    sample_size=8,
    cross_attention_dim=16,
    attention_head_dim=4,
    text_layers=1,
    text_heads=2,
    text_intermediate=32,
    norm_num_groups=4,
)
PRESETS = {"micro": MICRO, "tiny": TINY, "small": SMALL, "sd15": SD15}


def build_unet(spec: TinySDSpec):
    from diffusers import UNet2DConditionModel

    levels = len(spec.block_out_channels)
    down = ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)
    return UNet2DConditionModel(
        sample_size=spec.sample_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        layers_per_block=spec.layers_per_block,
        block_out_channels=spec.block_out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_num_groups,
    )


def build_text_encoder(spec: TinySDSpec, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec.cross_attention_dim,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.model_max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def build_vae(spec: TinySDSpec, shift_factor: float | None = None):
    """spec: anything with latent_channels and sample_size (also the flow toy's TinySD3Spec).

    shift_factor: SD3's VAE config field (its pipeline decodes latents / scaling_factor + shift_factor); None as SD.
    """
    from diffusers import AutoencoderKL

    # Smallest VAE that StableDiffusionPipeline accepts: only there so the folder loads as a full pipeline.
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=spec.latent_channels,
        norm_num_groups=8,
        sample_size=spec.sample_size * 2,
        shift_factor=shift_factor,
    )


def default_corpus(seed: int = 0, size: int = 2000) -> list[str]:
    """Generated captions used to train a tokenizer when the caller has none."""
    rng = random.Random(seed)
    return [
        f"a {rng.choice(words.ADJECTIVES)} {rng.choice(words.NOUNS)} {rng.choice(words.VERBS)} "
        f"{rng.choice(words.PLACES)}, {rng.choice(words.STYLES)}"
        for _ in range(size)
    ]


def save_sd_folder(out_dir: Path, tokenizer, text_encoder, unet, vae, scheduler_config: dict) -> Path:
    """Write a complete StableDiffusionPipeline folder (model_index.json, safetensors) to `out_dir`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_random_components(
    spec: TinySDSpec, device: str | torch.device, dtype: torch.dtype, *, seed: int = 0
):
    """In-memory random model (no folder written): `ModelComponents` for throughput benchmarks and GPU tests."""
    import tempfile

    from auditor.scoring.loading import ModelComponents

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_clip_tokenizer(
            default_corpus(seed), scratch, vocab_size=spec.vocab_size, model_max_length=spec.model_max_length
        )
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = (
            build_text_encoder(spec, vocab_size=len(tokenizer)).to(dtype).eval().requires_grad_(False)
        )
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules this UNet does not have.
        unet = torch.nn.Module.to(build_unet(spec), dtype).eval().requires_grad_(False)
    scheduler_config = dict(SD_V1_SCHEDULER, prediction_type=spec.prediction_type)
    return ModelComponents(Path("<in-memory>"), tokenizer, text_encoder, unet, scheduler_config)


def build_random_sd(
    out_dir: str | Path,
    spec: TinySDSpec = TINY,
    *,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    **overrides,
) -> Path:
    """A randomly initialised SD folder at `out_dir` (seeded): for tests and throughput benchmarks."""
    spec = replace(spec, **overrides) if overrides else spec
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(
        corpus if corpus is not None else default_corpus(seed),
        out_dir / "tokenizer",
        vocab_size=spec.vocab_size,
        model_max_length=spec.model_max_length,
    )
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(spec, vocab_size=len(tokenizer))
    unet = build_unet(spec)
    vae = build_vae(spec)
    scheduler_config = dict(SD_V1_SCHEDULER, prediction_type=spec.prediction_type)
    return save_sd_folder(out_dir, tokenizer, text_encoder, unet, vae, scheduler_config)
