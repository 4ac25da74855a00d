"""Scorer vs a plain reference built from diffusers' own StableDiffusionPipeline pieces."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from auditor import Scorer
from auditor.errors import ConfigError, InputDataError
from auditor.toy.models import build_random_sd, default_corpus
from tests.scores_close import assert_scores_close

CAPTIONS = [
    "a red cat sitting in a park, oil painting",
    "an old castle at night",
    "",
    "emoji 🐱 and ünïcode café",
    "the " * 90,  # truncated at the tokenizer's max length
]


def load_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_scores(model_dir, captions, latents, steps=1):
    """The paper's loop, one prompt at a time: CFG batch [uncond; cond], per-sample L2 of eps difference."""
    from diffusers import DDIMScheduler

    pipe = load_pipeline(model_dir)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(50)
    scores = []
    with torch.no_grad():
        for caption in captions:
            cond, uncond = pipe.encode_prompt(caption, "cpu", 1, True, negative_prompt=None)
            embeds = torch.cat([uncond, cond])
            norms = []
            for k in range(latents.shape[0]):
                x = latents[k : k + 1].clone()
                for t in scheduler.timesteps[:steps]:
                    out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
                    out_uncond, out_cond = out.chunk(2)
                    eps_uncond, eps_cond = (
                        to_eps(out_uncond, x, t, scheduler),
                        to_eps(out_cond, x, t, scheduler),
                    )
                    norms.append((eps_cond - eps_uncond).flatten().norm().item())
                    x = scheduler.step(out_uncond + 7.5 * (out_cond - out_uncond), t, x).prev_sample
            scores.append(np.mean(norms))
    return np.array(scores, dtype=np.float32)


def to_eps(output, x, t, scheduler):
    if scheduler.config.prediction_type == "epsilon":
        return output
    alpha = scheduler.alphas_cumprod[int(t)]
    return alpha.sqrt() * output + (1 - alpha).sqrt() * x


@pytest.mark.parametrize("steps", [1, 3])
def test_score_matches_pipeline_reference(tiny_model_dir, tiny_scorer, steps):
    latents = torch.randn(2, *tiny_scorer.latent_shape, generator=torch.Generator().manual_seed(7))
    expected = reference_scores(tiny_model_dir, CAPTIONS, latents, steps=steps)
    got = tiny_scorer.score(CAPTIONS, generations=2, steps=steps, latents=latents)
    assert got.dtype == np.float32 and got.shape == (len(CAPTIONS),)
    nonempty = [i for i, c in enumerate(CAPTIONS) if c]
    np.testing.assert_allclose(got[nonempty], expected[nonempty], rtol=1e-4)
    assert got[CAPTIONS.index("")] == pytest.approx(0.0, abs=1e-3 * float(got[nonempty].mean()))


def test_vprediction_scores_in_epsilon_space(tiny_vpred_model_dir):
    scorer = Scorer.from_pretrained(tiny_vpred_model_dir, device="cpu", dtype="fp32")
    assert scorer.scheduler.config.prediction_type == "v_prediction"
    latents = torch.randn(1, *scorer.latent_shape, generator=torch.Generator().manual_seed(3))
    captions = CAPTIONS[:2]
    for steps in (1, 2):
        expected = reference_scores(tiny_vpred_model_dir, captions, latents, steps=steps)
        np.testing.assert_allclose(scorer.score(captions, steps=steps, latents=latents), expected, rtol=1e-4)
    # The conversion matters: raw v differences are scaled by sqrt(alpha_bar_t1), far from epsilon ones.
    with torch.no_grad():
        emb = scorer.encode(torch.from_numpy(scorer.tokenize(captions[:1]).input_ids))
        x = latents.expand(1, -1, -1, -1)
        raw = scorer.unet(x, scorer.timesteps[0], encoder_hidden_states=emb).sample
        raw_u = scorer.unet(x, scorer.timesteps[0], encoder_hidden_states=scorer.empty_embedding()).sample
        raw_norm = (raw - raw_u).flatten().norm().item()
    assert scorer.score(captions[:1], latents=latents)[0] == pytest.approx(
        raw_norm * scorer.scheduler.alphas_cumprod[scorer.first_timestep].sqrt().item(), rel=1e-4
    )


def test_score_independent_of_batch_and_order(tiny_scorer):
    captions = default_corpus(seed=5, size=64)
    shuffled = captions[:]
    random.Random(1).shuffle(shuffled)
    in_batch = dict(zip(shuffled, tiny_scorer.score(shuffled, generations=2), strict=True))
    for caption in captions[:3]:
        alone = tiny_scorer.score([caption], generations=2)[0]
        assert_scores_close(alone, in_batch[caption], err_msg=caption)


def test_seed_controls_noise(tiny_scorer):
    captions = CAPTIONS[:2]
    first = tiny_scorer.score(captions, seed=11)
    np.testing.assert_array_equal(first, tiny_scorer.score(captions, seed=11))
    assert not np.allclose(first, tiny_scorer.score(captions, seed=12))
    # Each generation draws its own x_T; the first generation's noise does not change with n.
    torch.testing.assert_close(tiny_scorer.initial_latents(3, 11)[:1], tiny_scorer.initial_latents(1, 11))


def count_unet_rows(scorer):
    rows = []
    handle = scorer.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_shared_uncond_costs_one_unet_row_per_caption_and_generation(tiny_model_dir):
    scorer = Scorer.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32", batch_size=8)
    captions = [f"caption number {i}" for i in range(20)]
    rows, handle = count_unet_rows(scorer)
    try:
        scorer.score(captions, generations=3, seed=4)
        # + the uncond pass, once per generation, + the shared prefix's one-off check (full and replayed pass).
        assert sum(rows) == 3 * 20 + 3 + 2
        rows.clear()
        scorer.score(captions, generations=3, seed=4)
        assert sum(rows) == 3 * 20  # uncond now cached
        rows.clear()
        scorer.score(captions[:5] * 4, generations=3, seed=4)
        assert sum(rows) == 3 * 5  # identical token ids are scored once
    finally:
        handle.remove()


def test_duplicates_and_truncation_share_a_score(tiny_scorer):
    long_a = "a cat " * 60 + "tail one"
    long_b = "a cat " * 60 + "tail two"  # differs only after the cut
    scores = tiny_scorer.score(["a dog", long_a, "a dog", long_b])
    assert scores[0] == scores[2]
    assert scores[1] == scores[3]
    tokens = tiny_scorer.tokenize([long_a, "a dog"])
    assert tokens.truncated.tolist() == [True, False]
    assert tokens.n_tokens[0] > tiny_scorer.max_length and tokens.input_ids.shape[1] == tiny_scorer.max_length


def test_bad_captions_name_the_index(tiny_scorer):
    with pytest.raises(InputDataError, match="index 1 is NoneType"):
        tiny_scorer.score(["ok", None])
    with pytest.raises(InputDataError, match="index 0 is int"):
        tiny_scorer.score([3])
    with pytest.raises(InputDataError, match="list of strings"):
        tiny_scorer.score("a single string")
    assert tiny_scorer.score([]).shape == (0,)


def test_bad_options_fail_with_the_value(tiny_scorer):
    with pytest.raises(ConfigError, match="generations must be an int >= 1, got 0"):
        tiny_scorer.score(["x"], generations=0)
    with pytest.raises(ConfigError, match="steps must be an int in 1..50, got 51"):
        tiny_scorer.score(["x"], steps=51)
    with pytest.raises(ConfigError, match="latents have shape"):
        tiny_scorer.score(["x"], generations=2, latents=torch.zeros(1, *tiny_scorer.latent_shape))
    with pytest.raises(ConfigError, match="dtype 'fp8'"):
        Scorer.from_pretrained("unused", device="cpu", dtype="fp8")


def test_other_shapes_and_tokenizer_lengths(tmp_path):
    """Nothing assumes the tiny config: another width, latent size, channel count and max length."""
    model_dir = build_random_sd(
        tmp_path / "odd",
        seed=3,
        block_out_channels=(16, 32, 32),
        sample_size=8,
        latent_channels=3,
        cross_attention_dim=24,
        attention_head_dim=4,
        text_heads=2,
        model_max_length=40,
        vocab_size=600,
    )
    scorer = Scorer.from_pretrained(model_dir, device="cpu", dtype="fp32")
    assert scorer.latent_shape == (3, 8, 8) and scorer.max_length == 40
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference_scores(model_dir, CAPTIONS[:2], latents)
    np.testing.assert_allclose(scorer.score(CAPTIONS[:2], latents=latents), expected, rtol=1e-4)


def test_bf16_on_cpu_tracks_fp32(tiny_model_dir, tiny_scorer):
    captions = default_corpus(seed=9, size=16)
    reference = tiny_scorer.score(captions)
    bf16 = Scorer.from_pretrained(tiny_model_dir, device="cpu", dtype="bf16").score(captions)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, reference, rtol=5e-2)


def test_cuda_graphs_refused_off_cuda(tiny_model_dir):
    with pytest.raises(ConfigError, match="cuda_graphs=True needs a CUDA device, got cpu"):
        Scorer.from_pretrained(tiny_model_dir, device="cpu", cuda_graphs=True)
