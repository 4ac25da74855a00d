"""fp16 + CUDA graphs against fp32 eager. Skipped with a reason where torch sees no CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditor import Scorer
from auditor.scoring.scorer import Scorer as ScorerClass
from auditor.toy.models import SD15, build_random_components, default_corpus

pytestmark = pytest.mark.gpu


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank_a, rank_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def assert_close_ranking(fast: np.ndarray, reference: np.ndarray) -> None:
    assert spearman(fast, reference) >= 0.999
    assert np.max(np.abs(fast - reference) / np.abs(reference)) <= 1e-2


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return sorted(set(default_corpus(seed=21, size=200)))[:96]


def test_tiny_model_fp16_graphs_match_fp32_eager(tiny_model_dir, captions):
    reference = Scorer.from_pretrained(tiny_model_dir, device="cuda", dtype="fp32", cuda_graphs=False)
    fast = Scorer.from_pretrained(tiny_model_dir, device="cuda", dtype="fp16", batch_size=32)
    assert fast.runtime["cuda_graphs"] and not reference.runtime["cuda_graphs"]
    assert_close_ranking(fast.score(captions, generations=2), reference.score(captions, generations=2))


def test_sd_sized_model_fp16_graphs_match_fp32_eager(captions):
    reference = ScorerClass(
        build_random_components(SD15, "cuda", torch.float32), torch.device("cuda"), torch.float32
    )
    fast_components = build_random_components(SD15, "cuda", torch.float16)
    fast = ScorerClass(fast_components, torch.device("cuda"), torch.float16, batch_size=16)
    fast.optimize_for_cuda(cuda_graphs=True)
    subset = captions[:48]
    assert_close_ranking(fast.score(subset), reference.score(subset))


def test_graph_replay_equals_eager_fp16_and_padding_never_leaks(tiny_model_dir, captions):
    eager = Scorer.from_pretrained(
        tiny_model_dir, device="cuda", dtype="fp16", cuda_graphs=False, batch_size=32
    )
    graphed = Scorer.from_pretrained(
        tiny_model_dir, device="cuda", dtype="fp16", cuda_graphs=True, batch_size=32
    )
    full = graphed.score(captions[:32])
    np.testing.assert_allclose(full, eager.score(captions[:32]), rtol=2e-3)  # fp16 rounding, not logic
    # A partial batch is padded to 32 rows inside the graph; the 5 real rows must score as in the full batch.
    np.testing.assert_allclose(graphed.score(captions[:5]), full[:5], rtol=2e-3)
    # New captions after capture give their own scores: no stale static buffers.
    later = graphed.score(captions[32:64])
    np.testing.assert_allclose(later, eager.score(captions[32:64]), rtol=2e-3)
    assert not np.allclose(later, full)
