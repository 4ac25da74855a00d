"""Train the toy memorizing SD3-shaped model (rectified flow, CPU, seeded) and save it as a StableDiffusion3Pipeline
folder: `transformer/` (a tiny MMDiT), `text_encoder/` + `text_encoder_2/` (tiny CLIPTextModelWithProjection),
`tokenizer/` + `tokenizer_2/` (the toy CLIP BPE), no T5 (`text_encoder_3`/`tokenizer_3` null: the pipeline pads with
zeros), `scheduler/` (FlowMatchEulerDiscreteScheduler), `vae/` (only so the folder loads), safetensors only.

The data, batch schedule, tokenizer, manifest and build cache are the DDPM toy's (`auditor.toy.train`); only the
model and the objective differ. Imports torch/diffusers/transformers, never ray.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auditor.errors import ConfigError
from auditor.toy import models
from auditor.toy.data import ToyData, ToyDataSpec
from auditor.toy.manifest import save_manifest
from auditor.toy.train import (
    ToyBatches,
    ToyRecipe,
    TrainResult,
    build_cached,
    build_toy_tokenizer,
    format_duration,
    learning_rate_at,
    one_thread,
    recipe_from,
)

logger = logging.getLogger(__name__)

FAMILY = "sd3"
# Bump when the data or training recipe changes, so cached builds of the old recipe are not reused.
FLOW_RECIPE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class TinySD3Spec:
    """Shapes of a tiny SD3 model; every field maps to a diffusers/transformers config field.

    joint_attention_dim = 2 * text_hidden: the two CLIPs' penultimate states, concatenated, fill it exactly (SD3
    pads the concatenation with zeros up to the T5 width). pooled_projection_dim = 2 * text_projection.
    """

    sample_size: int = 8
    patch_size: int = 2
    latent_channels: int = 4
    num_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 4
    pos_embed_max_size: int = 8
    text_hidden: int = 32
    text_projection: int = 32
    # SD3 reads CLIP's hidden_states[-2]: with one layer that is the token + position embeddings, so each position
    # keeps its own token (the DDPM toy's text_layers=0 property); the pooled output still sees the whole caption.
    text_layers: int = 1
    text_heads: int = 4
    text_intermediate: int = 128
    # Toy captions are at most ~20 tokens; a short CLIP window keeps the joint attention cheap.
    model_max_length: int = 32
    # Length of the T5 part the pipeline appends (zeros without T5): StableDiffusion3Pipeline's default.
    max_sequence_length: int = 256
    # The SD3 paper's resolution-dependent shift is 1 at 256x256 px (32x32 latents) and 3 at 1024x1024 px; an 8x8
    # latent is below the base resolution, so no shift. Training and sampling use the same value.
    shift: float = 1.0

    @property
    def joint_attention_dim(self) -> int:
        return 2 * self.text_hidden

    @property
    def pooled_projection_dim(self) -> int:
        return 2 * self.text_projection


@dataclass(frozen=True, kw_only=True)
class FlowTrainSpec(ToyRecipe):
    """The flow toy's recipe: the shared fields (auditor.toy.train.ToyRecipe), then the flow-matching ones."""

    model: TinySD3Spec
    # Training sigma: logit-normal (SD3's default, mean 0 std 1); a fraction drawn uniform in (0, 1) instead. 0:
    # on the test preset, half uniform gave the same sampling cosine (0.940 vs 0.939) and AUC (1.0) as none.
    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_fraction: float = 0.0
    check_samples: int = 16
    check_generations: int = 4


_FLOW_MODEL = TinySD3Spec()
FLOW_PRESETS: dict[str, FlowTrainSpec] = {
    # 1200 steps x 24 memorized slots of 32: ~690 repeats per memorized caption at 10% dropout (16 captions x 800
    # repeats sampled their latents at cosine 0.94 mean). The step costs ~4x a step without T5: the pipeline's 256
    # zero T5 rows sit in every joint attention, so the recipe spends its steps on memorized slots.
    "full": FlowTrainSpec(
        model=_FLOW_MODEL,
        data=ToyDataSpec(num_memorized=40, num_seen_once_eval=300, num_held_out=300),
        steps=1200,
        memorized_per_batch=24,
        check_samples=40,
    ),
    # The tests' fixture.
    "test": FlowTrainSpec(
        model=_FLOW_MODEL,
        data=ToyDataSpec(num_memorized=16, num_seen_once_eval=120, num_held_out=200),
        steps=400,
        memorized_per_batch=24,
    ),
}


def resolve_flow_preset(preset: str | FlowTrainSpec) -> FlowTrainSpec:
    return recipe_from(preset, FLOW_PRESETS)


def scheduler_config(spec: TinySD3Spec) -> dict[str, Any]:
    return {"num_train_timesteps": 1000, "shift": spec.shift}


def build_transformer(spec: TinySD3Spec):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=spec.patch_size,
        in_channels=spec.latent_channels,
        num_layers=spec.num_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.joint_attention_dim,
        # SD3's context stream has the image stream's width.
        caption_projection_dim=spec.attention_head_dim * spec.num_attention_heads,
        pooled_projection_dim=spec.pooled_projection_dim,
        out_channels=spec.latent_channels,
        pos_embed_max_size=spec.pos_embed_max_size,
    )


def build_clip_with_projection(spec: TinySD3Spec, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.model_max_length,
        projection_dim=spec.text_projection,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="quick_gelu",
    )
    return CLIPTextModelWithProjection(config)


def assemble_pipeline(tokenizer, text_encoder, text_encoder_2, transformer, vae, spec: TinySD3Spec):
    """An in-memory StableDiffusion3Pipeline without T5 (both CLIPs share the toy tokenizer)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(spec)),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def sample_sigmas(spec: FlowTrainSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch,) float32 training sigmas in (0, 1): logit-normal, a `uniform_fraction` uniform, then the shift.

    As diffusers' SD3 training scripts (compute_density_for_timestep_sampling + the scheduler's shifted sigmas).
    """
    u = torch.sigmoid(spec.logit_mean + spec.logit_std * torch.randn(batch, generator=generator))
    uniform = torch.rand(batch, generator=generator)
    pick = torch.rand(batch, generator=generator) < spec.uniform_fraction
    u = torch.where(pick, uniform, u)
    shift = spec.model.shift
    return shift * u / (1 + (shift - 1) * u)


def train_flow_toy_model(
    out_dir: str | Path, preset: str | FlowTrainSpec = "test", *, seed: int = 0, log_every: int = 50
) -> tuple[Path, TrainResult]:
    """Train one flow toy model and write the StableDiffusion3Pipeline folder + manifest to `out_dir`.

    One CPU thread (restored afterwards), as the DDPM toy: reproducible and fair on a shared machine.
    """
    with one_thread():
        return _train(Path(out_dir), resolve_flow_preset(preset), seed, log_every)


def _train(out_dir: Path, spec: FlowTrainSpec, seed: int, log_every: int) -> tuple[Path, TrainResult]:
    started = time.perf_counter()
    model = spec.model
    if (model.latent_channels, model.sample_size) != (spec.data.latent_channels, spec.data.sample_size):
        raise ConfigError(
            f"the transformer takes {model.latent_channels}x{model.sample_size}x{model.sample_size} latents but "
            f"the data has {spec.data.latent_channels}x{spec.data.sample_size}x{spec.data.sample_size}; make the "
            "model spec and the data spec agree."
        )
    # 1. Data and tokenizer
    data = ToyData(spec.data, seed, spec.diverse_count)
    tokenizer, trigger_tokens = build_toy_tokenizer(
        data, out_dir / "tokenizer", seed, spec.tokenizer_vocab_size, model.model_max_length
    )
    longest = max(len(tokenizer(c).input_ids) for c in data.memorized + data.held_out)
    if longest > model.model_max_length:
        raise ConfigError(
            f"toy captions need {longest} tokens but model_max_length is {model.model_max_length}; raise it."
        )

    # 2. Models, seeded; the pipeline object only lends its encode_prompt, so training encodes as scoring does.
    torch.manual_seed(seed)
    text_encoder = build_clip_with_projection(model, len(tokenizer))
    text_encoder_2 = build_clip_with_projection(model, len(tokenizer))
    transformer = build_transformer(model)
    vae = models.build_vae(model, shift_factor=0.0)
    pipe = assemble_pipeline(tokenizer, text_encoder, text_encoder_2, transformer, vae, model)
    encoders = [text_encoder, text_encoder_2]
    parameters = [*transformer.parameters()]
    for encoder in encoders:
        encoder.requires_grad_(spec.train_text_encoder)
        encoder.train(spec.train_text_encoder)
        if spec.train_text_encoder:
            parameters += [*encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    transformer.train()
    vae.requires_grad_(False)

    # 3. Schedules fixed before training (the DDPM toy's batches, then noise and sigmas from the same stream).
    rng = np.random.default_rng([seed, 2])
    generator = torch.Generator().manual_seed(seed + 1)
    batches = ToyBatches(data, spec, rng, generator)
    result = TrainResult(steps=spec.steps, seconds=0.0, final_loss=float("nan"))
    window: list[float] = []
    log_started = time.perf_counter()

    # 4. Rectified-flow training: x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, t = 1000 sigma.
    for step in range(spec.steps):
        captions, latents = batches.batch(step)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = sample_sigmas(spec, spec.batch_size, generator)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, spec)
        with torch.set_grad_enabled(spec.train_text_encoder):
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=captions,
                prompt_2=None,
                prompt_3=None,
                device=torch.device("cpu"),
                do_classifier_free_guidance=False,
                max_sequence_length=model.max_sequence_length,
            )
        pred = transformer(
            hidden_states=noisy,
            timestep=sigmas * 1000,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = (pred.float() - (noise - latents)).pow(2).flatten(1).mean(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
        optimizer.step()
        result.total_samples += spec.batch_size
        result.kept_samples += spec.batch_size
        window.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            elapsed = time.perf_counter() - log_started
            result.losses.append(float(np.mean(window)))
            window = []
            logger.info(
                "flow toy train step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  elapsed %s  eta %s",
                step + 1,
                spec.steps,
                result.losses[-1],
                learning_rate_at(step, spec),
                (step + 1) / elapsed,
                format_duration(elapsed),
                format_duration(elapsed / (step + 1) * (spec.steps - step - 1)),
            )
    result.final_loss = result.losses[-1] if result.losses else float("nan")

    # 5. Save the pipeline folder and the manifest
    transformer.eval()
    for encoder in encoders:
        encoder.eval()
    pipe.save_pretrained(out_dir, safe_serialization=True)
    result.memorized_repeats = batches.repeats
    result.seconds = time.perf_counter() - started
    settings = flow_build_settings(spec, seed)
    save_manifest(out_dir, batches.manifest(trigger_tokens, settings))
    return out_dir, result


def flow_build_settings(spec: FlowTrainSpec, seed: int) -> dict[str, Any]:
    import json

    settings = {"family": FAMILY, "recipe_version": FLOW_RECIPE_VERSION, "seed": seed, "spec": spec.to_dict()}
    return json.loads(json.dumps(settings))


def build_flow_toy_model(
    out_dir: str | Path,
    preset: str | FlowTrainSpec = "full",
    *,
    seed: int = 0,
    force: bool = False,
    check: bool = True,
    log_every: int = 50,
) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the flow toy model at `out_dir`; returns the folder and its build record (`toy_build.json`).

    Caching and the refusal to overwrite are the DDPM toy's (`auditor.toy.train.build_cached`). `check` runs
    `auditor.toy.flow_check.check_flow_toy` (pipeline sampling + detection at three sigmas) and stores the result.
    """
    spec = resolve_flow_preset(preset)
    settings = flow_build_settings(spec, seed)

    def build(scratch: Path) -> dict[str, Any]:
        logger.info(
            "training the flow toy model: %d steps x batch %d, %d memorized captions (seed %d)",
            spec.steps,
            spec.batch_size,
            spec.data.num_memorized,
            seed,
        )
        _, result = train_flow_toy_model(scratch, spec, seed=seed, log_every=log_every)
        info: dict[str, Any] = {
            "settings": settings,
            "family": FAMILY,
            "preset": preset if isinstance(preset, str) else "custom",
            "train_seconds": round(result.seconds, 1),
            "final_loss": result.final_loss,
            "losses": result.losses,
            "torch_threads": 1,
        }
        if check:
            from auditor.toy.flow_check import check_flow_toy

            with one_thread():
                info["flow_check"] = check_flow_toy(
                    scratch, samples=spec.check_samples, generations=spec.check_generations, seed=seed
                )
        return info

    return build_cached(out_dir, settings, build, force=force)


def logit_normal_mass_above(sigma: float, spec: FlowTrainSpec) -> float:
    """Fraction of training sigmas above `sigma` (how often the model saw the region it is scored in)."""
    z = (math.log(sigma / (1 - sigma)) - spec.logit_mean) / spec.logit_std
    logit_part = 0.5 * math.erfc(z / math.sqrt(2))
    return (1 - spec.uniform_fraction) * logit_part + spec.uniform_fraction * (1 - sigma)
