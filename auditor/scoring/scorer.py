"""`Scorer`: the first-step memorization score of Wen et al. (ICLR 2024), batched, with a shared uncond pass.

score(p) = mean_k || eps(x_T^k, t1, E(p)) - eps(x_T^k, t1, E("")) ||_2, the norm per sample over C*H*W in float32.
x_T^k depends only on (seed, k), so eps(x_T^k, t1, E("")) is computed once per k and reused for every caption:
one denoiser row per caption and generation instead of two, and scores that do not depend on batch or order.
The same argument makes an SD UNet's head before its first cross-attention caption-independent: it is also
computed once per x_T (`shared_prefix`). How a caption is encoded, what "unconditional" is, the first step and
the scored output are the model family's (`auditor.scoring.families`); nothing here branches on the family.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auditor.errors import ConfigError
from auditor.scoring import magnitude, shared_prefix
from auditor.scoring.cascade import Cascade, CascadeScores, Stage, denoiser_rows_per_caption, score_stages
from auditor.scoring.families import Conditioning, ModelFamily, build_family
from auditor.scoring.loading import ModelComponents, fingerprint_model, load_components, resolve_model_dir
from auditor.scoring.tokens import TokenizedCaptions

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (x (B, C, H, W), t 0-d tensor, conditioning of B rows) -> native denoiser output (B, C_out, H, W)
Denoiser = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto": fp16 on CUDA, fp32 elsewhere (CPU half matmuls are slow and less accurate)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    return DTYPES[dtype]


class Scorer:
    """Scores captions with one model. Build with `Scorer.from_pretrained`; reuse it for many batches."""

    def __init__(
        self,
        components: ModelComponents,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int = 32,
        score_sigma: float | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        self.components = components
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.family: ModelFamily = build_family(components, device, dtype, score_sigma)
        # The family's main tokenizer / text encoder and its denoiser (a UNet or a transformer).
        self.tokenizer = components.tokenizer
        self.caption_tokenizer = self.family.tokenizer
        self.text_encoder = components.text_encoder
        self.unet = components.unet
        self.scheduler = self.family.scheduler
        self.timesteps = self.family.timesteps
        self.max_length = int(self.caption_tokenizer.widths[self.caption_tokenizer.main])
        self.latent_shape = self.family.latent_shape
        self.denoiser: Denoiser = self.family.denoise
        # What this scorer runs with, for logs and _audit.json.
        self.runtime: dict[str, Any] = {
            "family": self.family.name,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch_size,
            "score_sigma": self.family.score_sigma,
            "cuda_graphs": False,
            "channels_last": False,
            "torch": torch.__version__,
        }
        why_no_prefix = self.family.why_no_shared_prefix()
        if why_no_prefix is None:
            self.prefix_cache, why_no_prefix = shared_prefix.attach(self.unet)
        else:
            self.prefix_cache = None
        self.runtime["shared_prefix"] = self.prefix_cache is not None or f"off: {why_no_prefix}"
        self._prefix_checked = False
        self._latents_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._uncond_cache: dict[bytes, torch.Tensor] = {}
        self._unconditional: Conditioning | None = None
        self._fingerprint: str | None = None

    # 1. Construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        batch_size: int = 32,
        storage_options: dict[str, Any] | None = None,
        cuda_graphs: bool | None = None,
        score_sigma: float | None = None,
        variant: str | None = None,
    ) -> Scorer:
        """Load a diffusers pipeline folder (SD 1.x/2.x, SDXL, SD3, PixArt; the family from model_index.json): local
        path, hub id, or fsspec URI (s3://bucket/model).

        device None picks CUDA when present; dtype None picks fp16 on CUDA and fp32 on CPU.
        cuda_graphs None captures CUDA graphs for `batch_size` when on CUDA; True off CUDA is an error.
        score_sigma (flow-matching families only) scores at that noise level instead of sigma = 1: one CFG Euler
        step from x_T to sigma, then the magnitude there. Weights load from safetensors only.
        variant: the weights variant to load (diffusion_pytorch_model.<variant>.safetensors, e.g. "fp16"); None: the
        default weights, or the only variant a folder has (`auditor.scoring.layout.select_model_files`).
        """
        started = time.perf_counter()
        resolved_device = resolve_device(device)
        resolved_dtype = resolve_dtype(dtype, resolved_device)
        root = resolve_model_dir(model, storage_options, variant)
        components = load_components(root, resolved_device, resolved_dtype, variant)
        logger.info(
            "loaded %s on %s/%s in %.1fs",
            root,
            resolved_device,
            resolved_dtype,
            time.perf_counter() - started,
        )
        if cuda_graphs and resolved_device.type != "cuda":
            raise ConfigError(
                f"cuda_graphs=True needs a CUDA device, got {resolved_device}; pass --no-cuda-graphs."
            )
        scorer = cls(
            components, resolved_device, resolved_dtype, batch_size=batch_size, score_sigma=score_sigma
        )
        if resolved_device.type == "cuda":
            scorer.optimize_for_cuda(cuda_graphs=cuda_graphs is not False)
        logger.info("scorer runtime: %s", scorer.runtime)
        return scorer

    def optimize_for_cuda(self, cuda_graphs: bool = True, channels_last: bool = True) -> None:
        """channels_last UNet and, optionally, CUDA graphs for the text encoder and first-step denoiser at batch_size."""
        from auditor.scoring.cuda_graph import CudaGraphRunner, GraphedFirstStep

        if channels_last and self.family.why_no_shared_prefix() is None:
            self.unet.to(memory_format=torch.channels_last)
            self.runtime["channels_last"] = True
        if not cuda_graphs:
            return
        batch = self.batch_size
        example_cond = self.unconditional().expand(batch)
        example_cond = example_cond.with_tensors([t.contiguous() for t in example_cond.tensors()])
        example_sample = torch.randn(batch, *self.latent_shape, device=self.device, dtype=self.dtype)
        # A model whose forward syncs with the host cannot be captured; it then runs eagerly, and says so.
        try:
            self.denoiser = GraphedFirstStep(
                self.family.denoise, self.timesteps[0], example_sample, example_cond
            )
            self.runtime["cuda_graphs"] = True
        except RuntimeError as exc:
            logger.warning("denoiser CUDA-graph capture failed, running eagerly: %s", exc)
        text_forward = getattr(self.family, "text_forward", None)
        if text_forward is None or getattr(self.family, "use_attention_mask", True):
            return
        example_ids = torch.zeros(batch, self.max_length, dtype=torch.int64, device=self.device)
        try:
            self.family.text_forward = CudaGraphRunner(self.family.eager_text_encoder, [example_ids])
            self.runtime["text_encoder_cuda_graph"] = True
        except RuntimeError as exc:
            logger.warning("text-encoder CUDA-graph capture failed, running eagerly: %s", exc)

    @property
    def first_timestep(self) -> int:
        return int(self.timesteps[0])

    @property
    def family_name(self) -> str:
        return self.family.name

    @property
    def fingerprint(self) -> str:
        """sha256 of the files that determine scores, for the loaded variant (see `fingerprint_model`)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_model(Path(self.components.root), self.components.variant)
        return self._fingerprint

    # 2. Text ----------------------------------------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> TokenizedCaptions:
        """Every tokenizer of the family, ids packed side by side (`PackedTokenizer`); SD has one."""
        return self.caption_tokenizer.tokenize(captions)

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Conditioning:
        """(B, L_total) packed ids -> the batch's conditioning in the model dtype, as encode_prompt builds it."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.family.encode(self.to_device(input_ids), self.to_device(attention_mask))

    def condition_tokens(self, tokens: TokenizedCaptions) -> Conditioning:
        return self.condition(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) token embeddings in the model dtype (`condition(...).embeds`)."""
        return self.condition(input_ids, attention_mask).embeds

    def encode_tokens(self, tokens: TokenizedCaptions) -> torch.Tensor:
        """`tokenize` output -> (B, L, D) token embeddings in the model dtype."""
        return self.condition_tokens(tokens).embeds

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host -> device; through pinned memory on CUDA so the copy overlaps with queued GPU work."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def unconditional(self) -> Conditioning:
        """The family's unconditional conditioning, one row (SD: E("") padded to L)."""
        if self._unconditional is None:
            with torch.no_grad():
                self._unconditional = self.family.unconditional()
        return self._unconditional

    def empty_embedding(self) -> torch.Tensor:
        """(1, L, D): the unconditional token embeddings of the pipeline's CFG batch (SD: E(""))."""
        return self.unconditional().embeds

    def as_conditioning(self, prompt_embeds: torch.Tensor | Conditioning) -> Conditioning:
        """Conditioning as is; a bare (B, L, D) tensor for a family whose conditioning is only token embeddings."""
        if isinstance(prompt_embeds, Conditioning):
            return prompt_embeds
        uncond = self.unconditional()
        if uncond.pooled is not None or uncond.mask is not None:
            raise ConfigError(
                f"a {self.family.name} model is conditioned on more than token embeddings; pass a Conditioning "
                "(Scorer.condition) instead of a tensor."
            )
        return Conditioning(prompt_embeds)

    # 3. Noise ---------------------------------------------------------------------------------------------------
    def initial_latents(self, generations: int, seed: int) -> torch.Tensor:
        """x_T: (n, C, H, W) float32 on CPU, one draw per (seed, k), times the scheduler's init_noise_sigma."""
        key = (seed, generations)
        if key not in self._latents_cache:
            self._latents_cache[key] = magnitude.initial_latents(
                seed, generations, self.latent_shape, self.family.init_noise_sigma
            )
        return self._latents_cache[key]

    def eager_unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor | Conditioning
    ) -> torch.Tensor:
        """The denoiser's native output, eagerly (no CUDA graph)."""
        return self.family.denoise(sample, timestep, self.as_conditioning(prompt_embeds))

    def _uncond_first_output(self, latent: torch.Tensor) -> tuple[torch.Tensor, bytes]:
        """UNet output for E("") at t1 on one x_T (1, C, H, W), and its key: computed once per x_T, then reused.

        The pass runs eagerly so that it also records the shared prefix for the captions' passes on this x_T.
        """
        digest = hashlib.sha1(latent.float().cpu().numpy().tobytes())
        digest.update(f"{self.first_timestep}/{self.dtype}".encode())
        key = digest.digest()
        if key not in self._uncond_cache:
            sample = latent.to(self.device, self.dtype)
            recording = self.prefix_cache.recording(key) if self.prefix_cache else nullcontext()
            with torch.no_grad(), recording:
                self._uncond_cache[key] = self.eager_unet(sample, self.timesteps[0], self.unconditional())
            self._check_prefix(sample, key)
        return self._uncond_cache[key], key

    def _check_prefix(self, sample: torch.Tensor, key: bytes) -> None:
        """Trust the shared prefix only once a replayed forward matched a full one on a non-empty embedding."""
        if self.prefix_cache is None or self._prefix_checked:
            return
        self._prefix_checked = True
        if key not in self.prefix_cache.stored:
            self._disable_prefix("the first self-attention was not called through its processor")
            return
        # Scaled, not permuted: cross-attention is invariant to permuting the tokens.
        probe = self.unconditional().scaled(2.0)
        with torch.no_grad():
            full = self.eager_unet(sample, self.timesteps[0], probe).float()
            with self.prefix_cache.replaying(key):
                replayed = self.eager_unet(sample, self.timesteps[0], probe).float()
        error = float((replayed - full).abs().max() / full.abs().max().clamp_min(1e-12))
        if error > 1e-3:
            self._disable_prefix(f"a replayed forward differs from a full one by {error:.1e} (relative)")

    def _disable_prefix(self, why: str) -> None:
        logger.warning("shared UNet prefix disabled: %s", why)
        self.prefix_cache = None
        self.runtime["shared_prefix"] = f"off: {why}"

    # 4. Score ---------------------------------------------------------------------------------------------------
    def score(
        self,
        captions: Sequence[str],
        generations: int = 1,
        steps: int = 1,
        seed: int = 0,
        latents: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Memorization score per caption: (B,) float32. Higher means more likely memorized.

        latents, when given, is (n, C, H, W) and is x_T for every caption (n = generations).
        steps > 1 also averages over the first `steps` steps of a CFG trajectory from x_T with the family's sampler
        (DDIM-50, guidance 7.5 for SD; the flow-matching Euler sampler for SD3).
        """
        return self.score_tokenized(self.tokenize(captions), generations, steps, seed, latents)

    def score_tokenized(
        self,
        tokens: TokenizedCaptions,
        generations: int = 1,
        steps: int = 1,
        seed: int = 0,
        latents: torch.Tensor | None = None,
    ) -> np.ndarray:
        """`score` on already tokenized captions (the pipeline tokenizes on CPU workers)."""
        x_T = self.check_score_args(generations, steps, seed, latents)
        if len(tokens) == 0:
            return np.zeros(0, dtype=np.float32)
        # Identical token ids (after truncation) score identically: compute each once.
        unique_ids, first_index, inverse = np.unique(
            tokens.input_ids, axis=0, return_index=True, return_inverse=True
        )
        unique_masks = tokens.attention_mask[first_index]
        chunk_scores = []
        # no_grad, not inference_mode: the cached uncond tensors must stay usable by explain/mitigate's autograd.
        with torch.no_grad():
            for start in range(0, len(unique_ids), self.batch_size):
                stop = start + self.batch_size
                prompt_embeds = self.condition(
                    torch.from_numpy(unique_ids[start:stop]), torch.from_numpy(unique_masks[start:stop])
                )
                # Stays on the device: one host sync at the end, not one per batch.
                chunk_scores.append(self.magnitudes(prompt_embeds, x_T, steps))
        unique_scores = torch.cat(chunk_scores).cpu().numpy()
        return unique_scores[inverse.reshape(-1)]

    def score_cascade(
        self,
        captions: Sequence[str],
        *,
        screen_threshold: float,
        confirm_generations: int = 4,
        confirm_steps: int = 5,
        generations: int = 1,
        steps: int = 1,
        seed: int = 0,
    ) -> CascadeScores:
        """The two-stage score: `score(captions, generations, steps, seed)` for every caption, then, for the captions
        scoring over `screen_threshold`, `score(..., generations=confirm_generations, steps=confirm_steps, seed)`
        (`confirm_score`, NaN for the others). Each stage's scores are exactly what `score` gives alone.
        """
        for name, value in (("confirm_generations", confirm_generations), ("confirm_steps", confirm_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}.")
        cascade = Cascade(Stage(confirm_generations, confirm_steps), float(screen_threshold))
        self.check_score_args(confirm_generations, confirm_steps, seed, None)
        return score_stages(self, self.tokenize(captions), Stage(generations, steps), cascade, seed)

    def denoiser_rows_per_caption(self, stage: Stage) -> int:
        """Denoiser rows one caption costs in `stage` with this family's sampler (its lead-in steps included)."""
        return denoiser_rows_per_caption(stage, self.family.lead_in_steps)

    def check_score_args(
        self, generations: int, steps: int, seed: int, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """Validate the score options and return x_T (n, C, H, W) float32."""
        if not isinstance(generations, int) or generations < 1:
            raise ConfigError(f"generations must be an int >= 1, got {generations!r}.")
        most = self.family.scorable_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= most:
            raise ConfigError(f"steps must be an int in 1..{most}, got {steps!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}.")
        if latents is None:
            return self.initial_latents(generations, seed)
        expected = (generations, *self.latent_shape)
        if tuple(latents.shape) != expected:
            raise ConfigError(
                f"latents have shape {tuple(latents.shape)}, expected {expected} (generations, C, H, W) for this model."
            )
        return latents.detach().float().cpu()

    def magnitudes(
        self, prompt_embeds: torch.Tensor | Conditioning, x_T: torch.Tensor, steps: int = 1
    ) -> torch.Tensor:
        """Conditioning of B captions (or SD's (B, L, D) embeddings) and (n, C, H, W) x_T -> (B,) float32 scores
        on the device.

        Step 0 reuses the cached uncond output (one denoiser row per caption); later steps of a multi-step score
        run [uncond; cond] on the per-caption trajectory, as the pipeline's CFG loop does, with the family's
        sampler and guidance scale. The family's lead-in steps (a fixed-sigma score) are walked but not scored.
        """
        prompt_embeds = self.as_conditioning(prompt_embeds)
        family = self.family
        batch = len(prompt_embeds)
        total = torch.zeros(batch, dtype=torch.float32, device=self.device)
        x_T_device = x_T.to(self.device, self.dtype)
        lead_in = family.lead_in_steps
        for k in range(x_T.shape[0]):
            sample = x_T_device[k : k + 1].expand(batch, -1, -1, -1).contiguous()
            for index, timestep in enumerate(self.timesteps[: lead_in + steps]):
                if index == 0:
                    uncond, key = self._uncond_first_output(x_T[k : k + 1])
                    replaying = self.prefix_cache.replaying(key) if self.prefix_cache else nullcontext()
                    with replaying:
                        cond = self.denoiser(sample, timestep, prompt_embeds)
                    uncond = uncond.expand_as(cond)
                else:
                    empty = self.unconditional().expand(batch)
                    both = self.denoiser(
                        torch.cat([sample, sample]), timestep, Conditioning.cat(empty, prompt_embeds)
                    )
                    uncond, cond = both.chunk(2)
                if index >= lead_in:
                    scored_cond = family.scored_output(cond, sample, timestep)
                    scored_uncond = family.scored_output(uncond, sample, timestep)
                    total += magnitude.per_sample_l2(scored_cond.float() - scored_uncond.float())
                if index + 1 < lead_in + steps:
                    guided = magnitude.guided_output(uncond, cond, family.guidance_scale)
                    sample = family.step(guided, index, sample)
        return total / (x_T.shape[0] * steps)
