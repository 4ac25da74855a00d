"""Token significance (Wen et al. §3): which caption tokens drive the text-conditional noise magnitude.

Model math only (torch/diffusers); imports nothing outside auditor.scoring, auditor.errors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from auditor.scoring import magnitude
from auditor.scoring.scorer import Scorer
from auditor.scoring.tokens import tokenize_one_caption

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSignificance:
    """Significance of each caption token, in caption order.

    tokens: the tokenizer's pieces (CLIP BPE strings, e.g. "cat</w>"), BOS/EOS/padding removed, cut at the
    model's max length like the pipeline does. token_ids: (T,) int64, the same pieces as ids.
    significance: (T,) float32, the L2 norm over the hidden dim of d m / d e_p[position], averaged over
    generations and steps. share: (T,) float32, significance / its sum (uniform when the sum is 0).
    magnitude: the caption's score with the same options (equals `Scorer.score`). truncated: the caption had more
    tokens than fit, and only the kept ones are explained.
    """

    caption: str
    tokens: list[str]
    token_ids: np.ndarray
    significance: np.ndarray
    share: np.ndarray
    magnitude: float
    truncated: bool

    def ranking(self) -> list[int]:
        """Token indices, most significant first (ties keep caption order)."""
        return [int(i) for i in np.argsort(-self.significance, kind="stable")]


def explain(
    scorer: Scorer, caption: str, generations: int = 1, steps: int = 1, seed: int = 0
) -> TokenSignificance:
    """Significance of each token of `caption` for its memorization score.

    Convention (per sample, not the reference code's joint norm over all generations): for generation k and
    step s, m_{k,s} = || eps(x_s^k, t_s, e_p) - eps(x_s^k, t_s, e_0) ||_2 over C*H*W in float32, and
    significance[i] = mean_{k,s} || d m_{k,s} / d e_p[i] ||_2, with e_p the text-encoder output (L, D) and i a
    token position. Each gradient is local: x_s is held fixed, as in the reference. For steps > 1, x_s follows a
    correct CFG (w = 7.5) DDIM trajectory from x_T, uncond + w * (cond - uncond) (the reference guides with the
    roles swapped, i.e. with scale -6.5, which this does not copy). x_T depends only on (seed, k), as in `score`.

    Gradients run in the scorer's dtype (fp16 on CUDA by default); norms are float32.
    """
    # 1. Check inputs
    x_T = scorer.check_score_args(generations, steps, seed, None)
    tokenized = tokenize_one_caption(scorer.tokenizer, caption, "explain")
    n_kept = min(int(tokenized.n_tokens[0]), scorer.max_length - 2)
    started = time.perf_counter()

    # 2. Encode prompt; e_p is the leaf the gradients are taken against, one row per generation so that one
    # backward of sum_k m_k gives every per-sample gradient d m_k / d e_p (m_k depends on row k only).
    device, dtype = scorer.device, scorer.dtype
    with torch.no_grad():
        prompt_embeds = scorer.encode_tokens(tokenized).float()
        empty = scorer.empty_embedding().expand(generations, -1, -1)
    leaf = prompt_embeds.expand(generations, -1, -1).clone().requires_grad_(True)

    # 3. Walk the trajectory: at each step, one gradient pass (cond) and one no-grad pass (uncond)
    sample = x_T.to(device, dtype)
    grad_norms = torch.zeros(generations, scorer.max_length, dtype=torch.float32, device=device)
    total_magnitude = torch.zeros((), dtype=torch.float32, device=device)
    for index, timestep in enumerate(scorer.timesteps[:steps]):
        with torch.no_grad():
            uncond = scorer.unet(sample, timestep, encoder_hidden_states=empty, return_dict=False)[0]
        with torch.enable_grad():
            cond = scorer.unet(sample, timestep, encoder_hidden_states=leaf.to(dtype), return_dict=False)[0]
            eps_cond = magnitude.to_epsilon(cond, sample, int(timestep), scorer.scheduler)
            eps_uncond = magnitude.to_epsilon(uncond, sample, int(timestep), scorer.scheduler)
            magnitudes = magnitude.per_sample_l2(eps_cond.float() - eps_uncond.float())
            (grad,) = torch.autograd.grad(magnitudes.sum(), [leaf])
        grad_norms += grad.float().norm(p=2, dim=-1)
        total_magnitude += magnitudes.detach().sum()
        if index + 1 < steps:
            guided = magnitude.guided_output(uncond, cond.detach())
            sample = scorer.scheduler.step(guided, timestep, sample, return_dict=False)[0]

    # 4. Average, keep the caption's own token positions (BOS at 0, then n_kept tokens), normalise
    per_position = (grad_norms.sum(dim=0) / (generations * steps)).cpu().numpy()
    significance = per_position[1 : 1 + n_kept].astype(np.float32)
    total = float(significance.sum())
    share = significance / total if total > 0 else np.full(n_kept, 1.0 / n_kept, dtype=np.float32)
    token_ids = tokenized.input_ids[0, 1 : 1 + n_kept].astype(np.int64)
    logger.debug("explained %d tokens in %.2fs", n_kept, time.perf_counter() - started)
    return TokenSignificance(
        caption=caption,
        tokens=list(scorer.tokenizer.convert_ids_to_tokens(token_ids.tolist())),
        token_ids=token_ids,
        significance=significance,
        share=share.astype(np.float32),
        magnitude=float(total_magnitude) / (generations * steps),
        truncated=bool(tokenized.truncated[0]),
    )
