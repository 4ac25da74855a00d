"""MagnitudeFilter: the paper's training-time rule as a keep-mask, on a tiny UNet in a real training step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from auditor.errors import ConfigError
from auditor.scoring import magnitude
from auditor.toy.models import SD_V1_SCHEDULER, TINY, build_unet
from auditor.training import MagnitudeFilter

BATCH = 6


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(TINY)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "noisy_latents": torch.randn(BATCH, 4, 16, 16, generator=generator),
        "timesteps": torch.randint(0, 1000, (BATCH,), generator=generator),
        "text_embeds": torch.randn(BATCH, 77, 32, generator=generator) * 3,
        "empty_embeds": torch.randn(1, 77, 32, generator=generator),
    }


def predict(unet, batch, embeds):
    return unet(batch["noisy_latents"], batch["timesteps"], encoder_hidden_states=embeds, return_dict=False)[
        0
    ]


def reference_magnitudes(unet, batch) -> torch.Tensor:
    with torch.no_grad():
        cond = predict(unet, batch, batch["text_embeds"])
        uncond = predict(unet, batch, batch["empty_embeds"].expand(BATCH, -1, -1))
    return torch.stack([(cond[i] - uncond[i]).flatten().norm() for i in range(BATCH)])


def test_keep_mask_is_per_sample_magnitude_below_threshold(unet, batch):
    expected = reference_magnitudes(unet, batch)
    threshold = float(expected.median())
    cond = predict(unet, batch, batch["text_embeds"])
    keep_filter = MagnitudeFilter(threshold)
    keep = keep_filter(unet, batch["noisy_latents"], batch["timesteps"], cond, batch["empty_embeds"])
    assert keep.shape == (BATCH,) and keep.dtype == torch.bool
    assert torch.equal(keep, expected < threshold)
    assert 0 < int(keep.sum()) < BATCH
    magnitudes = keep_filter.magnitudes(
        unet, batch["noisy_latents"], batch["timesteps"], cond, batch["empty_embeds"]
    )
    assert magnitudes.dtype == torch.float32
    torch.testing.assert_close(magnitudes, expected, rtol=1e-5, atol=1e-5)
    assert keep_filter.n_seen == BATCH and keep_filter.n_dropped == BATCH - int(keep.sum())


def test_all_filtered_and_none_filtered(unet, batch):
    cond = predict(unet, batch, batch["text_embeds"])
    args = (unet, batch["noisy_latents"], batch["timesteps"], cond, batch["empty_embeds"])
    assert not MagnitudeFilter(1e-9)(*args).any()
    assert MagnitudeFilter(1e9)(*args).all()


def test_empty_embeds_may_be_given_per_sample(unet, batch):
    cond = predict(unet, batch, batch["text_embeds"])
    per_sample = batch["empty_embeds"].expand(BATCH, -1, -1).clone()
    f = MagnitudeFilter(1.0)
    torch.testing.assert_close(
        f.magnitudes(unet, batch["noisy_latents"], batch["timesteps"], cond, per_sample),
        f.magnitudes(unet, batch["noisy_latents"], batch["timesteps"], cond, batch["empty_embeds"]),
    )


def test_vprediction_norm_is_taken_in_epsilon_space(unet, batch):
    scheduler = DDPMScheduler.from_config(dict(SD_V1_SCHEDULER, prediction_type="v_prediction"))
    cond = predict(unet, batch, batch["text_embeds"]).detach()
    with torch.no_grad():
        uncond = predict(unet, batch, batch["empty_embeds"].expand(BATCH, -1, -1))
    expected = torch.stack(
        [
            (
                magnitude.to_epsilon(cond[i : i + 1], batch["noisy_latents"][i : i + 1], int(t), scheduler)
                - magnitude.to_epsilon(
                    uncond[i : i + 1], batch["noisy_latents"][i : i + 1], int(t), scheduler
                )
            ).norm()
            for i, t in enumerate(batch["timesteps"])
        ]
    )
    f = MagnitudeFilter(1.0, noise_scheduler=scheduler)
    got = f.magnitudes(unet, batch["noisy_latents"], batch["timesteps"], cond, batch["empty_embeds"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_step_under_autocast_with_the_mask(batch):
    torch.manual_seed(1)
    unet = build_unet(TINY)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    target = torch.randn_like(batch["noisy_latents"])
    expected = reference_magnitudes(unet, batch)
    threshold = float(expected.sort().values[2])  # drops at least half the batch
    keep_filter = MagnitudeFilter(threshold)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = predict(unet, batch, batch["text_embeds"])
        keep = keep_filter(unet, batch["noisy_latents"], batch["timesteps"], pred, batch["empty_embeds"])
    assert keep.dtype == torch.bool and keep.shape == (BATCH,)
    # bf16 autocast moves magnitudes a little; samples far from the threshold keep their fp32 decision.
    far = (expected - threshold).abs() > 0.05 * threshold
    assert torch.equal(keep[far], (expected < threshold)[far])
    assert 0 < int(keep.sum()) < BATCH
    loss = F.mse_loss(pred[keep].float(), target[keep].float())
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in unet.named_parameters())


def test_all_filtered_batch_leaves_the_caller_nothing_to_step(batch):
    torch.manual_seed(1)
    unet = build_unet(TINY)
    pred = predict(unet, batch, batch["text_embeds"])
    keep = MagnitudeFilter(1e-9)(
        unet, batch["noisy_latents"], batch["timesteps"], pred, batch["empty_embeds"]
    )
    assert not keep.any()
    assert pred[keep].shape[0] == 0  # the documented contract: the caller skips backward and the step


@pytest.mark.parametrize("threshold", [0, -2.0, float("inf"), "2"])
def test_threshold_must_be_positive(threshold):
    with pytest.raises(ConfigError, match="threshold must be"):
        MagnitudeFilter(threshold)


def test_cond_pred_shape_is_checked(unet, batch):
    with pytest.raises(ValueError, match="cond_pred has shape"):
        MagnitudeFilter(2.0)(
            unet,
            batch["noisy_latents"],
            batch["timesteps"],
            batch["noisy_latents"][:2],
            batch["empty_embeds"],
        )


def test_training_module_does_not_import_ray():
    code = "import sys, auditor.training; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_filter_reduces_toy_memorization(toy_model_dir, tmp_path):
    """One filtered training run on the same batches as the session's toy model (the unfiltered baseline)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "train_with_filter.py"
    spec = importlib.util.spec_from_file_location("train_with_filter", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    build = json.loads((toy_model_dir / "toy_build.json").read_text())
    result = example.compare(
        tmp_path,
        build["preset"],
        0.8,  # measured on the test toy: 1.2 barely helped; see examples/train_with_filter.py
        seed=build["settings"]["seed"],
        samples=16,
        baseline_dir=toy_model_dir,
    )
    example.print_table(result)
    plain, filtered = result["runs"]["no_filter"], result["runs"]["filter"]
    assert (
        filtered["kept_fraction"] > 0.5
    )  # half of each test-preset batch is ordinary; those stay in the loss
    assert (
        abs(filtered["held_out_score"] / plain["held_out_score"] - 1) < 0.25
    )  # ordinary captions still learned
    assert filtered["memorized_score"] < 0.85 * plain["memorized_score"]
    assert filtered["memorized_cosine"] < plain["memorized_cosine"] - 0.1
