"""Train the toy memorizing text-to-image model (DDPM epsilon loss, CPU, seeded) and save it as a diffusers folder.

`build_toy_model(out_dir, preset)` trains, saves `unet/ text_encoder/ tokenizer/ scheduler/ vae/` (safetensors) plus
the manifest (`auditor.toy.manifest`), checks that memorization is real by DDIM sampling, and caches: a folder that
already holds a complete build with the same settings is reused. Imports torch/diffusers/transformers, never ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from auditor.errors import ConfigError
from auditor.toy import models
from auditor.toy.data import ToyData, ToyDataSpec
from auditor.toy.manifest import ToyManifest, save_manifest
from auditor.toy.models import SD_V1_SCHEDULER, TinySDSpec
from auditor.toy.tokenizer import build_clip_tokenizer

logger = logging.getLogger(__name__)

BUILD_FILE = "toy_build.json"
# Bump when the data or training recipe changes, so cached builds of the old recipe are not reused.
RECIPE_VERSION = 2

# (unet, noisy_latents (B,C,H,W), timesteps (B,) int64, cond_pred (B,C,H,W) detached, empty_embeds (B,L,D)
#  detached = E("") with the current text encoder, repeated) -> keep mask (B,) bool. Called under torch.no_grad();
# the call signature of auditor.training.MagnitudeFilter.
SampleFilter = Callable[
    [torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


@dataclass(frozen=True, kw_only=True)
class ToyRecipe:
    """The fields every toy recipe has (the DDPM toy's ToyTrainSpec, the flow toy's FlowTrainSpec); with the seed,
    a recipe determines its build, and changing any field invalidates a cached build.

    A subclass narrows `model` to its family's shapes and adds its own fields after these: dataclasses keep a base
    field's position, so `to_dict()`'s key order, which the manifest and build record are written in, is the one
    the shipped builds were written with.
    """

    model: Any
    data: ToyDataSpec
    steps: int
    batch_size: int = 32
    # Batch slots reserved for memorized captions (the paper: 1 memorized sample in 4).
    memorized_per_batch: int = 8
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    tokenizer_vocab_size: int = 2048
    # False: the text encoder keeps its seeded random weights.
    train_text_encoder: bool = True

    @property
    def diverse_count(self) -> int:
        return self.steps * (self.batch_size - self.memorized_per_batch)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class ToyTrainSpec(ToyRecipe):
    """The DDPM (epsilon) toy's recipe."""

    model: TinySDSpec
    # DDIM samples per population for the memorization check after training.
    check_samples: int = 16


RecipeT = TypeVar("RecipeT", bound=ToyRecipe)


# text_layers=0: a CLIPTextModel with token + position embeddings and the final layer norm only, so each output
# position holds its own token. With transformer layers, joint training copies the whole caption into every later
# and padding position and the UNet reads it there: token significance then ranked the trigger word first for
# 1/16 memorized captions; with 0 layers, 16/16 (test preset, seed 0), at the same detection AUC. Real SD reads
# a pretrained CLIP whose positions keep token identity; this is the toy's stand-in for that property.
_TOY_MODEL = TinySDSpec(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=8,
    cross_attention_dim=64,
    attention_head_dim=8,
    text_layers=0,
    text_heads=4,
    text_intermediate=128,
    norm_num_groups=8,
)
PRESETS: dict[str, ToyTrainSpec] = {
    # The model behind `make demo`, benchmarks and BENCHMARKS.md: 48,000 samples, each memorized caption ~630 times
    # with its caption. Until 2026-12-01 it was 3200 steps x 32 (12 memorized), twice the compute for the same
    # memorization (DDIM cosine 0.973 then, 0.972 now; AUC 1.0 both; BENCHMARKS.md §3).
    "full": ToyTrainSpec(
        model=_TOY_MODEL,
        data=ToyDataSpec(num_memorized=40, num_seen_once_eval=300, num_held_out=300),
        steps=2000,
        batch_size=24,
        memorized_per_batch=14,
        check_samples=40,
    ),
    # ~1 min on 2 quiet CPU cores: the session fixture of the tests.
    "test": ToyTrainSpec(
        model=_TOY_MODEL,
        data=ToyDataSpec(num_memorized=16, num_seen_once_eval=120, num_held_out=200),
        steps=600,
        memorized_per_batch=16,
    ),
}


@dataclass
class TrainResult:
    """What happened during training: loss curve summary and the sample filter's effect."""

    steps: int
    seconds: float
    final_loss: float
    skipped_steps: int = 0
    kept_samples: int = 0
    total_samples: int = 0
    memorized_repeats: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def recipe_from(preset: str | RecipeT, presets: Mapping[str, RecipeT]) -> RecipeT:
    """`presets[preset]` for a preset name; a recipe of the presets' own class as it is."""
    recipe_type = type(next(iter(presets.values())))
    if isinstance(preset, recipe_type):
        return preset
    if not isinstance(preset, str):
        raise ConfigError(
            f"expected a toy preset name or a {recipe_type.__name__}, got a {type(preset).__name__}."
        )
    if preset not in presets:
        raise ConfigError(
            f"toy preset {preset!r} is not one of {', '.join(presets)}; pass --preset full or test."
        )
    return presets[preset]


def resolve_preset(preset: str | ToyTrainSpec) -> ToyTrainSpec:
    return recipe_from(preset, PRESETS)


def learning_rate_at(step: int, spec: ToyRecipe) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_toy_model(
    out_dir: str | Path,
    preset: str | ToyTrainSpec = "test",
    *,
    seed: int = 0,
    sample_filter: SampleFilter | None = None,
    log_every: int = 50,
) -> tuple[Path, TrainResult]:
    """Train one toy model and write the diffusers folder + manifest to `out_dir` (created; must not hold a model).

    sample_filter, when given, is called every step (under no_grad) after the conditional prediction and returns
    the (B,) bool keep-mask: the loss is the mean over kept samples only, and a step where none is kept does no
    backward and no optimizer step (it still counts as a step). This is the hook of the training-time mitigation
    (e.g. `auditor.training.MagnitudeFilter(threshold)`); it does not change the data, so runs with and without a
    filter see the same batches.

    Trains on one CPU thread (restored afterwards): these small ops gain little from more threads on a quiet
    machine, lose 10x or more to oversubscription on a busy one, and one thread keeps the result bitwise
    reproducible for a given torch build.
    """
    with one_thread():
        return _train(Path(out_dir), resolve_preset(preset), seed, sample_filter, log_every)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_toy_tokenizer(
    data: ToyData, out_dir: Path, seed: int, vocab_size: int, model_max_length: int
) -> tuple[Any, list[list[str]]]:
    """The toy CLIP BPE tokenizer trained on the run's captions, saved to `out_dir`; and each trigger's tokens.

    Raises RuntimeError when a trigger word is not a single token (the manifest names one token per trigger).
    """
    corpus = data.all_captions() + data.memorized * 20 + models.default_corpus(seed, 2000)
    tokenizer = build_clip_tokenizer(
        corpus, out_dir, vocab_size=vocab_size, model_max_length=model_max_length
    )
    trigger_tokens = [tokenizer.tokenize(word) for word in data.triggers]
    split = [word for word, tokens in zip(data.triggers, trigger_tokens, strict=True) if len(tokens) != 1]
    if split:
        raise RuntimeError(f"trigger words {split} are not single tokens; raise tokenizer_vocab_size")
    return tokenizer, trigger_tokens


class ToyBatches:
    """The training batches of one toy run, fixed before training (shared by the DDPM and the flow toys).

    `batch(step)` gives `memorized_per_batch` memorized captions (a fresh permutation per pass) and the rest diverse
    captions seen once, with caption dropout ("" for a dropped caption; never for the seen-once eval captions). It
    draws the diverse latents from `generator` and the dropout from `rng`, in that order, and nothing else, so a
    caller's own draws after it (noise, timesteps) keep their place in the streams.
    """

    def __init__(self, data: ToyData, spec: ToyRecipe, rng: np.random.Generator, generator: torch.Generator):
        self.data, self.spec, self.rng, self.generator = data, spec, rng, generator
        m = spec.data.num_memorized
        self.memorized_order = np.concatenate(
            [rng.permutation(m) for _ in range(math.ceil(spec.steps * spec.memorized_per_batch / m))]
        )
        self.eval_indices = (
            np.linspace(0, spec.diverse_count - 1, spec.data.num_seen_once_eval).round().astype(np.int64)
        )
        self.eval_set = {int(i): k for k, i in enumerate(self.eval_indices)}
        self.seen_once_latents = torch.zeros((len(self.eval_indices), *data.latent_shape))
        # Times each memorized caption was trained on with its caption (not dropped).
        self.repeats = [0] * m

    def batch(self, step: int) -> tuple[list[str], torch.Tensor]:
        """Captions (batch_size,) and latents (batch_size, C, H, W) float32 of training step `step`."""
        spec, data = self.spec, self.data
        per_batch_diverse = spec.batch_size - spec.memorized_per_batch
        mem_idx = self.memorized_order[
            step * spec.memorized_per_batch : (step + 1) * spec.memorized_per_batch
        ]
        div_idx = np.arange(step * per_batch_diverse, (step + 1) * per_batch_diverse)
        div_latents = data.diverse_latents(div_idx, self.generator)
        captions = [data.memorized[i] for i in mem_idx] + [data.diverse_caption(int(i)) for i in div_idx]
        latents = torch.cat([data.memorized_latents[torch.from_numpy(mem_idx)], div_latents])
        dropped = self.rng.random(spec.batch_size) < spec.data.caption_dropout
        for slot, index in enumerate(div_idx):
            if int(index) in self.eval_set:
                dropped[spec.memorized_per_batch + slot] = False  # an eval caption is seen exactly once
                self.seen_once_latents[self.eval_set[int(index)]] = div_latents[slot]
        for slot, index in enumerate(mem_idx):
            self.repeats[int(index)] += int(not dropped[slot])
        return ["" if d else c for c, d in zip(captions, dropped, strict=True)], latents

    def manifest(self, trigger_tokens: list[list[str]], settings: dict[str, Any]) -> ToyManifest:
        """The run's manifest; call after the last batch (seen-once latents and repeats fill in as batches go)."""
        data = self.data
        return ToyManifest(
            memorized=data.memorized,
            triggers=data.triggers,
            trigger_tokens=[tokens[0] for tokens in trigger_tokens],
            memorized_latents=data.memorized_latents,
            memorized_latent_index=list(range(len(data.memorized))),
            memorized_repeats=self.repeats,
            seen_once=[data.diverse_caption(int(i)) for i in self.eval_indices],
            seen_once_latents=self.seen_once_latents,
            held_out=data.held_out,
            settings=settings,
        )


def _train(
    out_dir: Path, spec: ToyTrainSpec, seed: int, sample_filter: SampleFilter | None, log_every: int
) -> tuple[Path, TrainResult]:
    from diffusers import DDPMScheduler

    started = time.perf_counter()
    # 1. Data and tokenizer
    data = ToyData(spec.data, seed, spec.diverse_count)
    tokenizer, trigger_tokens = build_toy_tokenizer(
        data, out_dir / "tokenizer", seed, spec.tokenizer_vocab_size, spec.model.model_max_length
    )

    def tokenize(captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # 2. Models, seeded
    torch.manual_seed(seed)
    text_encoder = models.build_text_encoder(spec.model, vocab_size=len(tokenizer))
    unet = models.build_unet(spec.model)
    vae = models.build_vae(spec.model)
    noise_scheduler = DDPMScheduler.from_config(dict(SD_V1_SCHEDULER, prediction_type="epsilon"))
    # The presets train the encoder jointly (a frozen random one memorized far worse in the same steps).
    text_encoder.requires_grad_(spec.train_text_encoder)
    parameters = [*unet.parameters(), *(text_encoder.parameters() if spec.train_text_encoder else [])]
    optimizer = torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    empty_ids = tokenize([""])
    unet.train()
    text_encoder.train(spec.train_text_encoder)

    # 3. Schedules fixed before training, so a sample filter never changes what data comes next.
    rng = np.random.default_rng([seed, 2])
    generator = torch.Generator().manual_seed(seed + 1)
    batches = ToyBatches(data, spec, rng, generator)
    result = TrainResult(steps=spec.steps, seconds=0.0, final_loss=float("nan"))
    window: list[float] = []
    log_started = time.perf_counter()

    # 4. DDPM epsilon training
    for step in range(spec.steps):
        captions, latents = batches.batch(step)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (spec.batch_size,), generator=generator
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, spec)
        with torch.set_grad_enabled(spec.train_text_encoder):
            prompt_embeds = text_encoder(tokenize(captions))[0]
        pred = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds).sample
        per_sample = (pred.float() - noise).pow(2).flatten(1).mean(dim=1)
        keep = torch.ones(spec.batch_size, dtype=torch.bool)
        if sample_filter is not None:
            with torch.no_grad():
                empty_embeds = text_encoder(empty_ids)[0].expand(spec.batch_size, -1, -1)
                keep = sample_filter(unet, noisy, timesteps, pred.detach(), empty_embeds.detach()).to(
                    torch.bool
                )
            if keep.shape != (spec.batch_size,):
                raise ValueError(
                    f"sample_filter returned shape {tuple(keep.shape)}, expected ({spec.batch_size},)"
                )
        result.total_samples += spec.batch_size
        result.kept_samples += int(keep.sum())
        if not keep.any():
            result.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            continue
        loss = per_sample[keep].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
        optimizer.step()
        window.append(float(loss.detach()))

        if (step + 1) % log_every == 0 or step + 1 == spec.steps:
            elapsed = time.perf_counter() - log_started
            mean_loss = float(np.mean(window)) if window else float("nan")
            result.losses.append(mean_loss)
            window = []
            logger.info(
                "toy train step %d/%d  loss %.4f  lr %.2e  %.1f steps/s  elapsed %s  eta %s",
                step + 1,
                spec.steps,
                mean_loss,
                learning_rate_at(step, spec),
                (step + 1) / elapsed,
                format_duration(elapsed),
                format_duration(elapsed / (step + 1) * (spec.steps - step - 1)),
            )
    result.final_loss = result.losses[-1] if result.losses else float("nan")
    if sample_filter is not None:
        logger.info(
            "sample filter kept %d/%d samples; %d steps skipped",
            result.kept_samples,
            result.total_samples,
            result.skipped_steps,
        )

    # 5. Save the pipeline folder and the manifest
    unet.eval()
    text_encoder.eval()
    models.save_sd_folder(out_dir, tokenizer, text_encoder, unet, vae, dict(SD_V1_SCHEDULER))
    result.memorized_repeats = batches.repeats
    result.seconds = time.perf_counter() - started
    manifest = batches.manifest(
        trigger_tokens, {"seed": seed, "recipe_version": RECIPE_VERSION, "spec": spec.to_dict()}
    )
    save_manifest(out_dir, manifest)
    return out_dir, result


def build_settings(spec: ToyTrainSpec, seed: int, filter_threshold: float | None = None) -> dict[str, Any]:
    settings = {"recipe_version": RECIPE_VERSION, "seed": seed, "spec": spec.to_dict()}
    if filter_threshold is not None:
        settings["filter_threshold"] = filter_threshold
    return json.loads(json.dumps(settings))


def magnitude_filter(threshold: float) -> SampleFilter:
    """The paper's training-time filter (keep samples with magnitude < threshold), from `auditor.training`."""
    try:
        from auditor.training import MagnitudeFilter
    except ImportError as exc:
        raise ConfigError(
            f"--filter-threshold {threshold} needs auditor.training.MagnitudeFilter, which is not available "
            f"({exc}); train without the filter."
        ) from exc
    return MagnitudeFilter(threshold)


def read_build_info(model_dir: str | Path) -> dict[str, Any] | None:
    """The build record of a complete toy build at `model_dir`, or None when there is none."""
    path = Path(model_dir) / BUILD_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def build_toy_model(
    out_dir: str | Path,
    preset: str | ToyTrainSpec = "full",
    *,
    seed: int = 0,
    force: bool = False,
    check: bool = True,
    log_every: int = 50,
    filter_threshold: float | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Train (or reuse) the toy model at `out_dir`; returns the folder and its build record (`toy_build.json`).

    Reuses a complete build with the same recipe, preset and seed. Refuses to overwrite anything else unless
    `force`. The folder is assembled in a sibling temporary folder and renamed into place, so an interrupted build
    never looks complete. `check` runs the DDIM memorization check and stores its cosine similarities.
    filter_threshold trains with `auditor.training.MagnitudeFilter(filter_threshold)` as the sample filter.
    """
    spec = resolve_preset(preset)
    settings = build_settings(spec, seed, filter_threshold)
    sample_filter = magnitude_filter(filter_threshold) if filter_threshold is not None else None

    def build(scratch: Path) -> dict[str, Any]:
        logger.info(
            "training the toy model: %d steps x batch %d, %d memorized captions (seed %d)",
            spec.steps,
            spec.batch_size,
            spec.data.num_memorized,
            seed,
        )
        _, result = train_toy_model(
            scratch, spec, seed=seed, sample_filter=sample_filter, log_every=log_every
        )
        info = {
            "settings": settings,
            "preset": preset if isinstance(preset, str) else "custom",
            "train_seconds": round(result.seconds, 1),
            "final_loss": result.final_loss,
            "losses": result.losses,
            "torch_threads": 1,
            "skipped_steps": result.skipped_steps,
            "kept_fraction": result.kept_samples / max(1, result.total_samples),
        }
        if check:
            from auditor.toy.sampling import check_memorization

            with one_thread():
                info["memorization_check"] = check_memorization(
                    scratch, samples=spec.check_samples, seed=seed
                )
        return info

    return build_cached(out_dir, settings, build, force=force)


def build_cached(
    out_dir: str | Path,
    settings: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    *,
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Reuse the complete build at `out_dir` whose record has these `settings`, or run `build(scratch)` and move
    the scratch folder into place with its record (`BUILD_FILE`, the dict `build` returns; it must hold
    "settings"). Refuses to overwrite anything else unless `force`. The scratch folder is a sibling of `out_dir`,
    so an interrupted build never looks complete.
    """
    out_dir = Path(out_dir)
    info = read_build_info(out_dir)
    if info is not None and info.get("settings") == settings and not force:
        logger.info("reusing the toy model at %s (same recipe, preset and seed)", out_dir)
        return out_dir, info
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        what = (
            "a toy build with other settings"
            if info is not None
            else "files that are not a complete toy build"
        )
        raise ConfigError(f"{out_dir} holds {what}; pass --force to replace it, or choose another folder.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        info = build(scratch)
        (scratch / BUILD_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        scratch.rename(out_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return out_dir, info
