"""Token significance (Wen et al. §3): which caption tokens drive the text-conditional noise magnitude.

Model math only (torch/diffusers); imports nothing outside auditor.scoring, auditor.errors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from auditor.scoring import magnitude
from auditor.scoring.families import Conditioning, TokenBlock
from auditor.scoring.scorer import Scorer
from auditor.scoring.tokens import TokenizedCaptions, tokenize_one_caption

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSignificance:
    """Significance of each caption token, in caption order.

    tokens: the tokenizer's pieces (CLIP BPE strings, e.g. "cat</w>"; T5 pieces for PixArt), special tokens and
    padding removed, cut at the model's max length like the pipeline does. token_ids: (T,) int64, the same pieces as
    ids. significance: (T,) float32, the L2 norm over the hidden dim of d m / d e_p[position], averaged over
    generations and steps. share: (T,) float32, significance / its sum (uniform when the sum is 0).
    magnitude: the caption's score with the same options (equals `Scorer.score`). truncated: the caption had more
    tokens than fit, and only the kept ones are explained. other: the same for the rows of the family's other
    tokenizers the denoiser attends to, by label (SD3: "t5" beside the CLIP rows reported here); empty for SD.
    """

    caption: str
    tokens: list[str]
    token_ids: np.ndarray
    significance: np.ndarray
    share: np.ndarray
    magnitude: float
    truncated: bool
    other: dict[str, TokenSignificance] = field(default_factory=dict)

    def ranking(self) -> list[int]:
        """Token indices, most significant first (ties keep caption order)."""
        return [int(i) for i in np.argsort(-self.significance, kind="stable")]


def explain(
    scorer: Scorer, caption: str, generations: int = 1, steps: int = 1, seed: int = 0
) -> TokenSignificance:
    """Significance of each token of `caption` for its memorization score.

    Convention (per sample, not the reference code's joint norm over all generations): for generation k and
    step s, m_{k,s} = || out(x_s^k, t_s, e_p) - out(x_s^k, t_s, e_0) ||_2 over C*H*W in float32 (out: the family's
    scored output, eps for SD), and significance[i] = mean_{k,s} || d m_{k,s} / d e_p[i] ||_2, with e_p the token
    embeddings the denoiser attends to (L, D) and i a token position; pooled text and masks are held fixed. Each
    gradient is local: x_s is held fixed, as in the reference. For steps > 1, x_s follows a correct CFG trajectory
    of the family's sampler from x_T (SD: DDIM, w = 7.5, uncond + w * (cond - uncond); the reference guides with
    the roles swapped, i.e. with scale -6.5, which this does not copy). x_T depends only on (seed, k), as in `score`.
    A scorer built with score_sigma < 1 (flow matching) first walks its approach step to sigma, without gradients,
    and explains the magnitude there, as it scores.

    Gradients run in the scorer's dtype (fp16 on CUDA by default); norms are float32.
    """
    # 1. Check inputs
    x_T = scorer.check_score_args(generations, steps, seed, None)
    tokenized = tokenize_one_caption(scorer.caption_tokenizer, caption, "explain")
    family = scorer.family
    started = time.perf_counter()

    # 2. Encode prompt; e_p is the leaf the gradients are taken against, one row per generation so that one
    # backward of sum_k m_k gives every per-sample gradient d m_k / d e_p (m_k depends on row k only).
    device, dtype = scorer.device, scorer.dtype
    with torch.no_grad():
        prompt = scorer.condition_tokens(tokenized).expand(generations)
        empty = scorer.unconditional().expand(generations)
    leaf = prompt.embeds.float().clone().requires_grad_(True)

    # 3. Walk the trajectory: at each step, one gradient pass (cond) and one no-grad pass (uncond)
    sample = x_T.to(device, dtype)
    grad_norms = torch.zeros(generations, leaf.shape[1], dtype=torch.float32, device=device)
    total_magnitude = torch.zeros((), dtype=torch.float32, device=device)
    lead_in = family.lead_in_steps
    for index, timestep in enumerate(scorer.timesteps[: lead_in + steps]):
        with torch.no_grad():
            uncond = family.denoise(sample, timestep, empty)
        if index < lead_in:
            # A fixed-sigma score's approach step: walked, not explained, as `Scorer.magnitudes` walks it.
            with torch.no_grad():
                cond = family.denoise(sample, timestep, prompt)
            sample = family.step(magnitude.guided_output(uncond, cond, family.guidance_scale), index, sample)
            continue
        with torch.enable_grad():
            cond = family.denoise(sample, timestep, Conditioning(leaf.to(dtype), prompt.pooled, prompt.mask))
            scored_cond = family.scored_output(cond, sample, timestep)
            scored_uncond = family.scored_output(uncond, sample, timestep)
            magnitudes = magnitude.per_sample_l2(scored_cond.float() - scored_uncond.float())
            (grad,) = torch.autograd.grad(magnitudes.sum(), [leaf])
        grad_norms += grad.float().norm(p=2, dim=-1)
        total_magnitude += magnitudes.detach().sum()
        if index + 1 < lead_in + steps:
            guided = magnitude.guided_output(uncond, cond.detach(), family.guidance_scale)
            sample = family.step(guided, index, sample)

    # 4. Average, keep each tokenizer's caption token positions, normalise
    per_position = (grad_norms.sum(dim=0) / (generations * steps)).cpu().numpy()
    mean_magnitude = float(total_magnitude) / (generations * steps)
    results = [
        _block_significance(scorer, block, tokenized, per_position, caption, mean_magnitude)
        for block in family.token_blocks()
    ]
    logger.debug("explained %d tokens in %.2fs", len(results[0].tokens), time.perf_counter() - started)
    main, *others = results
    return replace(
        main,
        other={block.label: result for block, result in zip(family.token_blocks()[1:], others, strict=True)},
    )


def _block_significance(
    scorer: Scorer,
    block: TokenBlock,
    tokenized: TokenizedCaptions,
    per_position: np.ndarray,
    caption: str,
    mean_magnitude: float,
) -> TokenSignificance:
    """The caption's tokens of one tokenizer: their rows of `per_position` and their pieces."""
    packed = scorer.caption_tokenizer
    tokenizer, start, width = packed.part(block.tokenizer)
    n_special = len(tokenizer("")["input_ids"])
    n_kept = int(tokenized.attention_mask[0, start : start + width].sum()) - n_special
    rows = slice(block.first_row + block.skip, block.first_row + block.skip + n_kept)
    significance = per_position[rows].astype(np.float32)
    total = float(significance.sum())
    share = significance / total if total > 0 else np.full(n_kept, 1.0 / max(n_kept, 1), dtype=np.float32)
    token_ids = tokenized.input_ids[0, start + block.skip : start + block.skip + n_kept].astype(np.int64)
    full_length = len(tokenizer(caption, truncation=False, verbose=False)["input_ids"])
    return TokenSignificance(
        caption=caption,
        tokens=list(tokenizer.convert_ids_to_tokens(token_ids.tolist())),
        token_ids=token_ids,
        significance=significance,
        share=share.astype(np.float32),
        magnitude=mean_magnitude,
        truncated=full_length > width,
    )
