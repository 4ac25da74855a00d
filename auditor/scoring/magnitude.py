"""The paper's text-conditional noise magnitude: timesteps, shared initial noise, epsilon conversion, norms.

Pure torch and diffusers schedulers; no model loading, no I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

# The paper's detection run: DDIM with 50 inference steps and classifier-free guidance 7.5.
NUM_INFERENCE_STEPS = 50
GUIDANCE_SCALE = 7.5


def build_ddim_scheduler(scheduler_config: dict[str, Any]) -> DDIMScheduler:
    """DDIM built from the model's own scheduler config (as diffusers' `DDIMScheduler.from_config`), 50 steps."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    return scheduler


def noise_seed(seed: int, generation: int) -> int:
    """A 64-bit generator seed that depends only on (seed, generation), never on the caption or the batch."""
    return int(np.random.SeedSequence([seed, generation]).generate_state(1, dtype=np.uint64)[0])


def initial_latents(
    seed: int, generations: int, shape: tuple[int, int, int], init_noise_sigma: float
) -> torch.Tensor:
    """x_T for each generation: (n, C, H, W) float32 on CPU, drawn on CPU so every device sees the same noise."""
    draws = [
        torch.randn(
            shape, generator=torch.Generator("cpu").manual_seed(noise_seed(seed, k)), dtype=torch.float32
        )
        for k in range(generations)
    ]
    return torch.stack(draws) * init_noise_sigma


def to_epsilon(
    model_output: torch.Tensor, sample: torch.Tensor, timestep: int | torch.Tensor, scheduler: Any
) -> torch.Tensor:
    """Convert a UNet output to epsilon space so scores compare across epsilon- and v-prediction models.

    timestep: one int for the whole batch, or (B,) per sample (training batches); scheduler: any diffusers
    scheduler with `alphas_cumprod` and `config.prediction_type` (DDIM, DDPM, ...).
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return model_output
    t = torch.as_tensor(timestep, device="cpu").long().reshape(-1)
    alpha_prod = scheduler.alphas_cumprod[t].to(device=sample.device, dtype=torch.float32)
    alpha_prod = alpha_prod.reshape(-1, *([1] * (sample.dim() - 1)))
    output, sample = model_output.float(), sample.float()
    if prediction_type == "v_prediction":
        return alpha_prod.sqrt() * output + (1 - alpha_prod).sqrt() * sample
    if prediction_type == "sample":
        return (sample - alpha_prod.sqrt() * output) / (1 - alpha_prod).sqrt()
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample"
    )


def per_sample_l2(difference: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) any dtype -> (B,) float32: L2 over all C*H*W values of each sample, computed in float32."""
    return difference.float().flatten(1).norm(p=2, dim=1)


def guided_output(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float = GUIDANCE_SCALE
) -> torch.Tensor:
    """Classifier-free guidance, uncond + w * (cond - uncond), in the model's own output space."""
    return uncond + guidance_scale * (cond - uncond)
