"""The UNet head before the first cross-attention is computed once per x_T, and only where that is exact."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from auditor import Scorer
from auditor.scoring import shared_prefix
from auditor.toy.models import default_corpus
from tests.scores_close import assert_scores_close
from tests.unit.test_scorer import CAPTIONS, reference_scores


def test_captions_reuse_the_first_self_attention(tiny_model_dir):
    scorer = Scorer.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32", batch_size=8)
    assert scorer.runtime["shared_prefix"] is True
    computed = []
    inner = scorer.prefix_cache.inner
    scorer.prefix_cache.inner = lambda attn, hidden, *args, **kwargs: (
        computed.append(hidden.shape[0]) or inner(attn, hidden, *args, **kwargs)
    )
    captions = default_corpus(seed=2, size=20)
    with_prefix = scorer.score(captions, generations=2)
    # Only the uncond pass of each x_T and the one-off full pass of the check compute it; no caption's pass does.
    assert computed == [1, 1, 1]
    scorer.prefix_cache = None  # the full forward for every caption
    assert_scores_close(with_prefix, scorer.score(captions, generations=2))


def test_cached_head_depends_on_the_noise(tiny_scorer):
    """Each x_T has its own recorded head: other latents, other seeds, other generations."""
    captions = CAPTIONS[:2]
    latents = torch.randn(2, *tiny_scorer.latent_shape, generator=torch.Generator().manual_seed(5))
    first = tiny_scorer.score(captions, generations=2, latents=latents)
    second = tiny_scorer.score(captions, generations=2, latents=latents * 0.5)
    assert not np.allclose(first, second)
    again = tiny_scorer.score(captions, generations=2, latents=latents)
    np.testing.assert_allclose(first, again, rtol=1e-6)  # same batch: the same scorer on the same inputs


def save_unet_variant(model_dir, out_dir, **unet_overrides):
    """A copy of `model_dir` whose UNet is rebuilt (random weights) from its config plus `unet_overrides`."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(model_dir, out_dir)
    config = dict(UNet2DConditionModel.load_config(out_dir / "unet"), **unet_overrides)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(out_dir / "unet", safe_serialization=True)
    return out_dir


def test_not_used_where_self_attention_sees_the_text(tiny_model_dir, tmp_path):
    model_dir = save_unet_variant(tiny_model_dir, tmp_path / "cross-only", only_cross_attention=True)
    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32")
    assert scorer.prefix_cache is None
    assert "attends to the text" in scorer.runtime["shared_prefix"]
    latents = torch.randn(1, *scorer.latent_shape, generator=torch.Generator().manual_seed(1))
    expected = reference_scores(model_dir, CAPTIONS[:2], latents)
    np.testing.assert_allclose(scorer.score(CAPTIONS[:2], latents=latents), expected, rtol=1e-4)


def test_not_used_where_the_time_embedding_sees_more_than_t():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        class_embed_type="timestep",
    )
    module, why = shared_prefix.first_self_attention(unet)
    assert module is None and "class_embed_type" in why


def test_a_wrongly_shared_attention_is_caught_by_the_check(tiny_model_dir, monkeypatch):
    """Had the structural rule been wrong, the one-off replay-vs-full check turns the cache off before use."""

    def deep_self_attention(unet):
        return unet.up_blocks[-1].attentions[0].transformer_blocks[0].attn1, ""

    monkeypatch.setattr(shared_prefix, "first_self_attention", deep_self_attention)
    scorer = Scorer.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")
    latents = torch.randn(1, *scorer.latent_shape, generator=torch.Generator().manual_seed(2))
    got = scorer.score(CAPTIONS[:2], latents=latents)
    assert scorer.prefix_cache is None
    assert "differs from a full one" in scorer.runtime["shared_prefix"]
    np.testing.assert_allclose(got, reference_scores(tiny_model_dir, CAPTIONS[:2], latents), rtol=1e-4)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scorers_sharing_one_unet_share_the_processor(tiny_model_dir, dtype):
    from auditor.scoring.loading import load_components

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    components = load_components(tiny_model_dir, torch.device("cpu"), torch_dtype)
    first = Scorer(components, torch.device("cpu"), torch_dtype, batch_size=4)
    second = Scorer(components, torch.device("cpu"), torch_dtype, batch_size=16)
    assert first.prefix_cache is second.prefix_cache
    captions = default_corpus(seed=4, size=16)
    assert_scores_close(first.score(captions), second.score(captions))
