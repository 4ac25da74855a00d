"""Inference-time mitigation (Wen et al. §4): optimise the prompt embedding until the first-step magnitude is low.

Model math only (torch/diffusers); imports nothing outside auditor.scoring, auditor.errors.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
import weakref
from dataclasses import dataclass

import torch

from auditor.errors import ConfigError
from auditor.scoring import magnitude
from auditor.scoring.families import Conditioning
from auditor.scoring.scorer import Scorer
from auditor.scoring.tokens import tokenize_one_caption

logger = logging.getLogger(__name__)

# AdamW's default decoupled weight decay, as the reference optimiser (torch.optim.AdamW([e], lr)).
WEIGHT_DECAY = 0.01
_FLOAT32_UNETS: weakref.WeakKeyDictionary[Scorer, torch.nn.Module] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class MitigationResult:
    """prompt_embeds: (1, L, D) float32 on CPU, the optimised text-encoder output (BOS row unchanged); pass it to
    a pipeline as `prompt_embeds` with the same x_T. magnitude_before/after: per-sample first-step magnitude
    averaged over generations, before any update and for the returned embedding. iterations: AdamW updates taken.
    reached_target: magnitude_after <= target. pooled_prompt_embeds: (1, P) float32, the optimised pooled text for
    families that have one (SDXL, SD3; pass it as `pooled_prompt_embeds`), else None.
    """

    prompt_embeds: torch.Tensor
    magnitude_before: float
    magnitude_after: float
    iterations: int
    reached_target: bool
    pooled_prompt_embeds: torch.Tensor | None = None


def check_mitigate_args(target: float, lr: float, max_iters: int) -> None:
    if not isinstance(target, numbers.Real) or not math.isfinite(target) or target <= 0:
        raise ConfigError(
            f"target must be a finite magnitude > 0, got {target!r}; non-memorized captions score about 1 on SD "
            "(a per-sample magnitude, as `auditor score` prints), so a target of 1-3 is typical."
        )
    if not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r} (the paper uses 0.05).")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
        raise ConfigError(f"max_iters must be an int >= 0, got {max_iters!r} (the paper uses 10).")


def require_sampler_from_x_T(scorer: Scorer, what: str) -> None:
    """mitigate and sampling run the model's own sampler from x_T; a fixed-sigma scorer walks another trajectory."""
    if scorer.family.lead_in_steps:
        raise ConfigError(
            f"{what} works at the sampler's first step (sigma = 1) with its own schedule; this scorer scores at "
            f"sigma {scorer.family.score_sigma:g}. Load the model without score_sigma (drop --score-sigma)."
        )


def float32_unet(scorer: Scorer) -> torch.nn.Module:
    """The scorer's UNet when it is float32, else a float32 copy of it (made once per scorer, then reused).

    A copy, not an in-place cast: the scorer may have captured CUDA graphs over its UNet's weight buffers, and
    casting there and back would reallocate them under the graphs. The copy upcasts the weights the scorer uses
    (exact), costing 4 bytes a parameter (3.4 GB for SD's UNet) beside the half-precision one.
    """
    unet = scorer.unet
    if next(unet.parameters()).dtype == torch.float32:
        return unet
    if scorer not in _FLOAT32_UNETS:
        _FLOAT32_UNETS[scorer] = copy.deepcopy(unet).to(torch.float32).eval().requires_grad_(False)
    return _FLOAT32_UNETS[scorer]


def first_step_magnitudes(
    scorer: Scorer,
    unet: torch.nn.Module,
    prompt_embeds: torch.Tensor | Conditioning,
    x_T: torch.Tensor,
    uncond: torch.Tensor,
) -> torch.Tensor:
    """(n,) float32 per-sample magnitudes at t1 for float32 conditioning of 1 or n rows (SD: (1 or n, L, D)
    embeddings), differentiable.

    unet: the denoiser to run (`float32_unet`); x_T: (n, C, H, W) float32 on the device; uncond: its float32 output
    for the unconditional conditioning on x_T.
    """
    family = scorer.family
    timestep = scorer.timesteps[0]
    cond_rows = scorer.as_conditioning(prompt_embeds).expand(x_T.shape[0])
    cond = family.denoise(x_T, timestep, cond_rows, module=unet)
    scored_cond = family.scored_output(cond, x_T, timestep)
    scored_uncond = family.scored_output(uncond, x_T, timestep)
    return magnitude.per_sample_l2(scored_cond.float() - scored_uncond.float())


def mitigate(
    scorer: Scorer,
    caption: str,
    target: float,
    lr: float = 0.05,
    max_iters: int = 10,
    generations: int = 1,
    seed: int = 0,
) -> MitigationResult:
    """Optimise the caption's conditioning, the full (L, D) token embeddings (and the pooled text where the family
    has one), until its first-step magnitude <= target.

    Convention: the loss is the per-sample magnitude m_k = || eps(x_T^k, t1, e) - eps(x_T^k, t1, E("")) ||_2
    (the family's scored output; eps for SD) averaged over the n generations, i.e. on the same scale as
    `Scorer.score(..., steps=1)` for any n (the reference code uses one norm over all n samples jointly, about
    sqrt(n) larger). As the reference: AdamW (weight decay 0.01) at the first step t1, the early-stop check before
    each update, at most `max_iters` updates. Unlike it, everything runs in float32 (a float32 copy of a
    half-precision denoiser, see `float32_unet`) and a CLIP BOS row is not a parameter at all, so neither its
    gradient nor the weight decay can move it. Generate with the result and the same x_T (`sample_latents`, or a
    pipeline given `prompt_embeds` and `latents=scorer.initial_latents(generations, seed)`), else the optimised
    embedding does not apply.
    """
    # 1. Check inputs
    check_mitigate_args(target, lr, max_iters)
    require_sampler_from_x_T(scorer, "mitigate")
    x_T = scorer.check_score_args(generations, 1, seed, None)
    tokenized = tokenize_one_caption(scorer.caption_tokenizer, caption, "explain or mitigate")
    family = scorer.family
    started = time.perf_counter()

    # 2. Encode prompt and the fixed unconditional side
    device = scorer.device
    with torch.no_grad():
        initial = scorer.condition_tokens(tokenized).float()
        empty = scorer.unconditional().float().expand(generations)
    main_block = family.token_blocks()[0]
    fixed_rows = main_block.skip if main_block.first_row == 0 else 0
    bos = initial.embeds[:, :fixed_rows]
    rest = initial.embeds[:, fixed_rows:].clone().requires_grad_(True)
    pooled = None if initial.pooled is None else initial.pooled.clone().requires_grad_(True)
    parameters = [rest] if pooled is None else [rest, pooled]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=WEIGHT_DECAY)
    sample = x_T.to(device, torch.float32)

    def conditioning() -> Conditioning:
        return Conditioning(torch.cat([bos, rest], dim=1), pooled, initial.mask)

    # 3. Optimise at the first step
    unet = float32_unet(scorer)
    with torch.enable_grad():
        with torch.no_grad():
            uncond = family.denoise(sample, scorer.timesteps[0], empty, module=unet)
        before = after = None
        iterations = 0
        while True:
            loss = first_step_magnitudes(scorer, unet, conditioning(), sample, uncond).mean()
            after = float(loss.detach())
            if before is None:
                before = after
            if after <= target or iterations == max_iters:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iterations += 1

    logger.info(
        "mitigated in %d updates (%.2fs): magnitude %.4f -> %.4f, target %.4f",
        iterations,
        time.perf_counter() - started,
        before,
        after,
        target,
    )
    return MitigationResult(
        prompt_embeds=torch.cat([bos, rest.detach()], dim=1).cpu(),
        magnitude_before=before,
        magnitude_after=after,
        iterations=iterations,
        reached_target=after <= target,
        pooled_prompt_embeds=None if pooled is None else pooled.detach().cpu(),
    )


def sample_latents(
    scorer: Scorer,
    prompt_embeds: torch.Tensor | Conditioning,
    x_T: torch.Tensor,
    steps: int = magnitude.NUM_INFERENCE_STEPS,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """Sample with CFG from x_T as the family's pipeline does, on its sampler (SD: DDIM-50 as
    StableDiffusionPipeline): (n, C, H, W) float32 on CPU, before the VAE.

    prompt_embeds: conditioning of 1 or n rows (SD: (1 or n, L, D) embeddings), any dtype; x_T: (n, C, H, W).
    steps < 50 stops early on the 50-step schedule. guidance_scale None: the family's (7.5 for SD, the paper's).
    """
    require_sampler_from_x_T(scorer, "sampling")
    family = scorer.family
    scale = family.guidance_scale if guidance_scale is None else guidance_scale
    n = x_T.shape[0]
    sample = x_T.to(scorer.device, scorer.dtype)
    cond = scorer.as_conditioning(prompt_embeds).to(scorer.dtype).expand(n)
    both = Conditioning.cat(scorer.unconditional().expand(n), cond)
    with torch.no_grad():
        for index, timestep in enumerate(scorer.timesteps[:steps]):
            output = family.denoise(torch.cat([sample, sample]), timestep, both)
            uncond, cond_output = output.chunk(2)
            guided = magnitude.guided_output(uncond, cond_output, scale)
            sample = family.step(guided, index, sample)
    return sample.float().cpu()
