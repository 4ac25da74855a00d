"""Training-time mitigation (Wen et al. §5): drop a sample from the loss when its text-conditional magnitude is high.

A drop-in for a diffusers text-to-image training loop. Imports torch and auditor.scoring only, never ray.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import torch

from auditor.errors import ConfigError
from auditor.scoring.magnitude import per_sample_l2, to_epsilon

logger = logging.getLogger(__name__)


class MagnitudeFilter:
    """Keep-mask for a training batch: True where || pred(x_t, t, e_p) - pred(x_t, t, E("")) ||_2 < threshold.

    The norm is per sample over C*H*W in float32, at each sample's own training timestep and noise, as the
    reference `train_text_to_image.py --hard_threshold 2` does (its threshold is 2 for SD-1.4 fine-tuning).
    Usage, after the loss's forward pass:

        keep = magnitude_filter(unet, noisy_latents, timesteps, model_pred, empty_embeds)
        if not keep.any():
            continue  # every sample filtered: skip backward and the optimizer step (and the EMA update)
        loss = F.mse_loss(model_pred[keep].float(), target[keep].float())

    Index anything else per-sample (SNR weights, timesteps) with `keep` too. noise_scheduler: the training
    scheduler; give it for v-prediction or sample-prediction models so the norm is taken in epsilon space (as the
    auditor's score); None means the UNet predicts epsilon. The counters `n_seen`/`n_dropped` accumulate.
    """

    def __init__(self, threshold: float, noise_scheduler: Any | None = None):
        if not isinstance(threshold, numbers.Real) or not math.isfinite(threshold) or threshold <= 0:
            raise ConfigError(
                f"threshold must be a finite magnitude > 0, got {threshold!r} (the paper uses 2)."
            )
        self.threshold = float(threshold)
        self.noise_scheduler = noise_scheduler
        prediction_type = noise_scheduler.config.prediction_type if noise_scheduler is not None else "epsilon"
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(
                f"noise_scheduler has prediction_type {prediction_type!r}; "
                "expected epsilon, v_prediction or sample."
            )
        self.n_seen = 0
        self.n_dropped = 0

    def magnitudes(
        self,
        unet: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_pred: torch.Tensor,
        empty_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """(B,) float32 per-sample magnitudes. noisy_latents, cond_pred: (B, C, H, W); timesteps: (B,) or scalar;
        empty_embeds: (1 or B, L, D), the text encoder's output for "" padded to L (not zeros)."""
        batch = noisy_latents.shape[0]
        if cond_pred.shape != noisy_latents.shape:
            raise ValueError(
                f"cond_pred has shape {tuple(cond_pred.shape)}, expected {tuple(noisy_latents.shape)} like "
                "noisy_latents: pass the UNet's prediction for the batch's captions."
            )
        embeds = empty_embeds.expand(batch, -1, -1) if empty_embeds.shape[0] == 1 else empty_embeds
        # The same mode (train/eval) and autocast state as the caller's forward: the two predictions must differ
        # only by the text.
        with torch.no_grad():
            uncond_pred = unet(noisy_latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        if self.noise_scheduler is None:
            return per_sample_l2(cond_pred.detach().float() - uncond_pred.float())
        eps_cond = to_epsilon(cond_pred.detach(), noisy_latents, timesteps, self.noise_scheduler)
        eps_uncond = to_epsilon(uncond_pred, noisy_latents, timesteps, self.noise_scheduler)
        return per_sample_l2(eps_cond.float() - eps_uncond.float())

    def __call__(
        self,
        unet: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond_pred: torch.Tensor,
        empty_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """(B,) bool keep-mask on noisy_latents' device; all False when every sample is filtered."""
        magnitudes = self.magnitudes(unet, noisy_latents, timesteps, cond_pred, empty_embeds)
        keep = magnitudes < self.threshold
        n_dropped = int((~keep).sum())
        self.n_seen += int(keep.numel())
        self.n_dropped += n_dropped
        if n_dropped:
            logger.debug(
                "filtered %d/%d samples (max magnitude %.3f)", n_dropped, keep.numel(), magnitudes.max()
            )
        return keep.to(noisy_latents.device)
