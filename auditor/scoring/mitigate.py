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
    reached_target: magnitude_after <= target.
    """

    prompt_embeds: torch.Tensor
    magnitude_before: float
    magnitude_after: float
    iterations: int
    reached_target: bool


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
    prompt_embeds: torch.Tensor,
    x_T: torch.Tensor,
    uncond: torch.Tensor,
) -> torch.Tensor:
    """(n,) float32 per-sample magnitudes at t1 for (1 or n, L, D) float32 embeddings, differentiable.

    x_T: (n, C, H, W) float32 on the device; uncond: the float32 UNet output for E("") on x_T.
    """
    timestep = scorer.timesteps[0]
    embeds = prompt_embeds.expand(x_T.shape[0], -1, -1)
    cond = unet(x_T, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
    eps_cond = magnitude.to_epsilon(cond, x_T, int(timestep), scorer.scheduler)
    eps_uncond = magnitude.to_epsilon(uncond, x_T, int(timestep), scorer.scheduler)
    return magnitude.per_sample_l2(eps_cond - eps_uncond)


def mitigate(
    scorer: Scorer,
    caption: str,
    target: float,
    lr: float = 0.05,
    max_iters: int = 10,
    generations: int = 1,
    seed: int = 0,
) -> MitigationResult:
    """Optimise e_p = E(caption), the full (L, D) text-encoder output, until its first-step magnitude <= target.

    Convention: the loss is the per-sample magnitude m_k = || eps(x_T^k, t1, e) - eps(x_T^k, t1, E("")) ||_2
    averaged over the n generations, i.e. on the same scale as `Scorer.score(..., steps=1)` for any n (the
    reference code uses one norm over all n samples jointly, about sqrt(n) larger). As the reference: AdamW
    (weight decay 0.01) at the first step t1, the early-stop check before each update, at most `max_iters`
    updates. Unlike it, everything runs in float32 (a float32 copy of a half-precision UNet, see `float32_unet`) and
    the BOS row is not a parameter at all, so neither its gradient nor the weight decay can move it.
    Generate with the result and the same x_T (`sample_latents`, or a pipeline given `prompt_embeds` and
    `latents=scorer.initial_latents(generations, seed)`), else the optimised embedding does not apply.
    """
    # 1. Check inputs
    check_mitigate_args(target, lr, max_iters)
    x_T = scorer.check_score_args(generations, 1, seed, None)
    tokenized = tokenize_one_caption(scorer.tokenizer, caption, "explain or mitigate")
    started = time.perf_counter()

    # 2. Encode prompt and the fixed unconditional side
    device = scorer.device
    with torch.no_grad():
        initial = scorer.encode_tokens(tokenized).float()
        empty = scorer.empty_embedding().float().expand(generations, -1, -1)
    bos = initial[:, :1]
    rest = initial[:, 1:].clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([rest], lr=lr, weight_decay=WEIGHT_DECAY)
    sample = x_T.to(device, torch.float32)

    # 3. Optimise at the first step
    unet = float32_unet(scorer)
    with torch.enable_grad():
        with torch.no_grad():
            uncond = unet(sample, scorer.timesteps[0], encoder_hidden_states=empty, return_dict=False)[0]
        before = after = None
        iterations = 0
        while True:
            loss = first_step_magnitudes(scorer, unet, torch.cat([bos, rest], dim=1), sample, uncond).mean()
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
    )


def sample_latents(
    scorer: Scorer,
    prompt_embeds: torch.Tensor,
    x_T: torch.Tensor,
    steps: int = magnitude.NUM_INFERENCE_STEPS,
    guidance_scale: float = magnitude.GUIDANCE_SCALE,
) -> torch.Tensor:
    """DDIM-sample with CFG from x_T as StableDiffusionPipeline does: (n, C, H, W) float32 on CPU, before the VAE.

    prompt_embeds: (1 or n, L, D), any dtype; x_T: (n, C, H, W). steps < 50 stops early on the 50-step schedule.
    """
    n = x_T.shape[0]
    sample = x_T.to(scorer.device, scorer.dtype)
    embeds = prompt_embeds.to(scorer.device, scorer.dtype).expand(n, -1, -1)
    both_embeds = torch.cat([scorer.empty_embedding().expand(n, -1, -1), embeds])
    with torch.no_grad():
        for timestep in scorer.timesteps[:steps]:
            output = scorer.unet(
                torch.cat([sample, sample]), timestep, encoder_hidden_states=both_embeds, return_dict=False
            )[0]
            uncond, cond = output.chunk(2)
            guided = magnitude.guided_output(uncond, cond, guidance_scale)
            sample = scorer.scheduler.step(guided, timestep, sample, return_dict=False)[0]
    return sample.float().cpu()
