"""The SD3-shaped flow toy: a real StableDiffusion3Pipeline folder that memorizes, and its reference score."""

from __future__ import annotations

import json

import pytest
import torch

from auditor.errors import ConfigError
from auditor.toy.flow import FLOW_PRESETS, build_flow_toy_model
from auditor.toy.flow_check import (
    detection_scores,
    load_flow_pipeline,
    reference_velocity_magnitudes,
    sampler_sigmas,
)
from auditor.toy.manifest import load_manifest

# The test preset (seed 0) measured AUC 1.000 at every sigma and memorized sampling cosine 0.558 (seen-once 0.004);
# a 20-step (untrained) build scored AUC 0.47-0.55 and cosine 0.01.
MIN_AUC_SIGMA1 = 0.9
MIN_MEMORIZED_COSINE = 0.4


@pytest.fixture(scope="session")
def flow_toy(tmp_path_factory):
    """The flow toy, `test` preset, seed 0, built with its check: 3 min of CPU (one thread); 19 min wall on 2 cores
    at load average 10-20 (2026-12-01)."""
    return build_flow_toy_model(tmp_path_factory.mktemp("flow-toy") / "model", "test", seed=0)


@pytest.fixture(scope="session")
def flow_pipe(flow_toy):
    return load_flow_pipeline(flow_toy[0])


@pytest.mark.slow
def test_folder_is_a_stable_diffusion_3_pipeline_without_t5(flow_toy, flow_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    model_dir, _ = flow_toy
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not list(model_dir.rglob("*.bin")) and list(model_dir.rglob("*.safetensors"))
    assert isinstance(flow_pipe.transformer, SD3Transformer2DModel)
    assert isinstance(flow_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert type(flow_pipe.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert flow_pipe.text_encoder_3 is None
    # Without T5 the pipeline appends max_sequence_length zero rows after the two CLIPs' tokens.
    embeds, _, pooled, _ = flow_pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False)
    clip_length = flow_pipe.tokenizer.model_max_length
    assert embeds.shape == (1, clip_length + 256, flow_pipe.transformer.config.joint_attention_dim)
    assert torch.count_nonzero(embeds[:, clip_length:]) == 0
    assert pooled.shape == (1, flow_pipe.transformer.config.pooled_projection_dim)


@pytest.mark.slow
def test_build_check_memorized_captions_are_reproduced_and_detected(flow_toy):
    _, info = flow_toy
    check = info["flow_check"]
    assert check["sampling"]["memorized_cosine_mean"] >= MIN_MEMORIZED_COSINE
    assert check["sampling"]["seen_once_cosine_mean"] < 0.5
    for negatives in ("held-out", "seen-once"):
        assert check["detection"]["sigma=1"][negatives]["auc"] >= MIN_AUC_SIGMA1


@pytest.mark.slow
def test_reference_score_trajectory_columns_agree(flow_pipe, flow_toy):
    captions = load_manifest(flow_toy[0]).memorized[:3]
    one = reference_velocity_magnitudes(flow_pipe, captions, generations=2, seed=5)
    two = reference_velocity_magnitudes(flow_pipe, captions, generations=2, seed=5, steps=2, batch_size=2)
    assert one.shape == (3, 1) and two.shape == (3, 2)
    torch.testing.assert_close(two[:, 0], one[:, 0])
    assert sampler_sigmas(flow_pipe)[0] == 1.0
    scores = detection_scores(flow_pipe, captions, generations=1, seed=5, fixed_sigma=0.94)
    assert set(scores) == {"sigma=1", "steps=2 mean", "2nd step", "sigma=0.94"}
    with pytest.raises(ValueError, match="starts at sigma 1"):
        reference_velocity_magnitudes(flow_pipe, captions, sigmas=[0.9, 0.5])


@pytest.mark.slow
def test_a_cached_build_is_reused_and_another_is_refused(flow_toy):
    model_dir, info = flow_toy
    again, reused = build_flow_toy_model(model_dir, "test", seed=0)
    assert reused == info
    with pytest.raises(ConfigError, match="holds a toy build with other settings"):
        build_flow_toy_model(model_dir, "test", seed=1)


def test_unknown_preset_is_refused():
    from auditor.toy.flow import resolve_flow_preset

    with pytest.raises(ConfigError, match="is not one of full, test"):
        resolve_flow_preset("huge")
    assert FLOW_PRESETS["full"].data.num_memorized == 40


def test_cli_refuses_the_filter_for_the_sd3_family(tmp_path, capsys):
    from auditor.cli import main

    code = main(["toy-model", "build", str(tmp_path / "m"), "--family", "sd3", "--filter-threshold", "1.0"])
    assert code == 2
    assert "--filter-threshold 1.0 is for the sd family only" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
