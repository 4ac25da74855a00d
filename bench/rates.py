"""Throughput loops shared by the CPU and GPU benchmarks: captions per second, device-synchronised."""

from __future__ import annotations

import time

import torch

from auditor.scoring.cascade import Cascade, Stage, score_stages
from auditor.scoring.scorer import Scorer


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def paper_loop_rate(scorer: Scorer, captions: list[str], seconds: float, min_captions: int = 8) -> float:
    """The reference code's cost, in any family: per prompt, encode ["", p] and run the denoiser once on the CFG
    batch [x; x] (SD: the text encoder and the UNet; SD3: both CLIPs and T5, then the MMDiT).
    """
    x_T = scorer.initial_latents(1, 0).to(scorer.device, scorer.dtype)
    t1 = scorer.timesteps[0]
    family = scorer.family

    def score_one(caption: str) -> None:
        cond = scorer.condition_tokens(scorer.tokenize(["", caption]))
        out = family.denoise(torch.cat([x_T, x_T]), t1, cond)
        uncond, conditional = out.chunk(2)
        scored = (
            family.scored_output(conditional, x_T, t1).float() - family.scored_output(uncond, x_T, t1).float()
        )
        scored.flatten(1).norm(dim=1).cpu()

    with torch.inference_mode():
        score_one(captions[-1])  # warm-up
        done, start = 0, now(scorer.device)
        while True:
            for caption in captions:
                score_one(caption)
                done += 1
                if done >= min_captions and time.perf_counter() - start > seconds:
                    return done / (now(scorer.device) - start)


def batched_rate(scorer: Scorer, captions: list[str], seconds: float, chunks: int = 4) -> float:
    """The shared-uncond scorer at its batch size, on pre-tokenized captions (tokenizing is the CPU stage's job)."""
    batch = scorer.batch_size
    tokens = scorer.tokenize(captions[: batch * chunks])
    batches = [
        (tokens.input_ids[i : i + batch], tokens.attention_mask[i : i + batch])
        for i in range(0, len(tokens), batch)
    ]
    x_T = scorer.initial_latents(1, 0)

    def run(ids, mask) -> None:
        with torch.no_grad():
            scorer.magnitudes(scorer.condition(torch.from_numpy(ids), torch.from_numpy(mask)), x_T).cpu()

    run(*batches[0])  # warm-up, and the uncond pass (cached afterwards)
    done, start = 0, now(scorer.device)
    while True:
        for ids, mask in batches:
            run(ids, mask)
            done += len(ids)
        if time.perf_counter() - start > seconds:
            return done / (now(scorer.device) - start)


def stages_rate(
    scorer: Scorer, captions: list[str], screen: Stage, cascade: Cascade | None, seconds: float
) -> tuple[float, float]:
    """(captions/s, denoiser rows per caption) of `score_stages` (one stage when cascade is None, else the
    screen then the confirm stage on the rows over its screening threshold) at the scorer's batch size."""
    tokens = scorer.tokenize(captions)
    score_stages(scorer, tokens.take(slice(0, scorer.batch_size)), screen, cascade, seed=0)  # warm-up
    done, rows, start = 0, 0, now(scorer.device)
    while True:
        result = score_stages(scorer, tokens, screen, cascade, seed=0)
        done += len(tokens)
        rows += sum(result.denoiser_rows.values())
        if time.perf_counter() - start > seconds:
            return done / (now(scorer.device) - start), rows / done
