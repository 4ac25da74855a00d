"""Model families: the Scorer against a plain reference that calls each pipeline's own encode_prompt and its
denoiser directly (fp32), batch/order/duplicate invariance, and the refusals of folders that cannot be scored.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from auditor import Scorer
from auditor.errors import ModelLoadError
from auditor.scoring import magnitude
from auditor.scoring.families import Conditioning
from auditor.scoring.layout import check_model_dir, detect_layout

FAMILIES = ["sdxl", "sd3", "sd3-no-t5", "pixart-sigma"]
# Longer than every tokenizer's limit (CLIP 77, PixArt's T5 300, SD3's T5 256).
LONG_CAPTION = " ".join(["a red cat sitting in a sunny park next to a blue bicycle"] * 40)
CAPTIONS = ["a red cat sitting in a park", "", "an oil painting of a lighthouse at dusk, 😀", LONG_CAPTION]


def load_pipeline(folder):
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    # Components saved as null must be passed as None (StableDiffusion3Pipeline without T5).
    absent = {name: None for name, entry in index.items() if entry == [None, None]}
    return DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **absent).to("cpu")


def first_timestep_and_scheduler(pipe, family: str):
    """The family's first step, built here from the pipeline's own scheduler class or DDIM as documented."""
    if family.startswith("sd3"):
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(50)
    else:
        scheduler = magnitude.build_ddim_scheduler(pipe.scheduler.config)
    return scheduler.timesteps[0], scheduler


def reference_outputs(pipe, family: str, caption: str, x: torch.Tensor):
    """(scored cond, scored uncond) for one caption on x (n, C, H, W), through the pipeline's own methods."""
    n = x.shape[0]
    t, scheduler = first_timestep_and_scheduler(pipe, family)
    with torch.no_grad():
        if family == "sdxl":
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                caption, device="cpu", num_images_per_prompt=n, do_classifier_free_guidance=True
            )
            size = pipe.default_sample_size * pipe.vae_scale_factor
            time_ids = pipe._get_add_time_ids(
                (size, size), (0, 0), (size, size), embeds.dtype,
                text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim),
            ).repeat(n, 1)  # fmt: skip

            def run(e, p):
                added = {"text_embeds": p, "time_ids": time_ids}
                out = pipe.unet(x, t, encoder_hidden_states=e, added_cond_kwargs=added, return_dict=False)[0]
                return magnitude.to_epsilon(out, x, int(t), scheduler)

            return run(embeds, pooled), run(negative, negative_pooled)
        if family.startswith("sd3"):
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                caption, None, None, device="cpu", num_images_per_prompt=n, do_classifier_free_guidance=True
            )

            def run(e, p):
                return pipe.transformer(
                    hidden_states=x, timestep=t.expand(n), encoder_hidden_states=e, pooled_projections=p,
                    return_dict=False,
                )[0]  # fmt: skip

            return run(embeds, pooled), run(negative, negative_pooled)
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            caption, do_classifier_free_guidance=True, negative_prompt="", num_images_per_prompt=n,
            device="cpu", clean_caption=False, max_sequence_length=300,
        )  # fmt: skip

        def run(e, m):
            out = pipe.transformer(
                x, encoder_hidden_states=e, encoder_attention_mask=m, timestep=t.expand(n),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
            )[0]  # fmt: skip
            return magnitude.to_epsilon(out.chunk(2, dim=1)[0], x, int(t), scheduler)

        return run(embeds, mask), run(negative, negative_mask)


def reference_scores(pipe, family: str, captions: list[str], x: torch.Tensor) -> np.ndarray:
    scores = []
    for caption in captions:
        cond, uncond = reference_outputs(pipe, family, caption, x)
        scores.append(float(magnitude.per_sample_l2(cond - uncond).mean()))
    return np.array(scores, dtype=np.float32)


@pytest.fixture(scope="module")
def scorers(family_model_dirs):
    return {
        name: Scorer.from_pretrained(family_model_dirs[name], device="cpu", dtype="fp32", batch_size=3)
        for name in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_the_pipelines_own_encode_prompt_and_denoiser(family, family_model_dirs, scorers):
    scorer = scorers[family]
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, *scorer.latent_shape, generator=generator)
    got = scorer.score(CAPTIONS, generations=2, latents=x)
    expected = reference_scores(load_pipeline(family_model_dirs[family]), family, CAPTIONS, x)
    # atol: "" scores 0 in the reference, and ~1e-6 here where its row shares a batch with others.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert (got[[0, 2, 3]] > 1e-3).all(), got


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_do_not_depend_on_batch_order_or_duplicates(family, family_model_dirs, scorers):
    scorer = scorers[family]
    alone = np.array([scorer.score([c], generations=2, seed=3)[0] for c in CAPTIONS])
    shuffled = [CAPTIONS[3], CAPTIONS[0], CAPTIONS[0], CAPTIONS[2], CAPTIONS[1], CAPTIONS[3]]
    together = scorer.score(shuffled, generations=2, seed=3)
    np.testing.assert_allclose(together, alone[[3, 0, 0, 2, 1, 3]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_step_scores_run_on_the_familys_sampler(family, scorers):
    scorer = scorers[family]
    one, two = scorer.score(CAPTIONS[:1], steps=1), scorer.score(CAPTIONS[:1], steps=2)
    assert np.isfinite(two).all() and two[0] != one[0]


def test_sd3_second_step_follows_the_flow_match_euler_sampler(family_model_dirs, scorers):
    """steps=2 averages sigma = 1 and the next sigma of the Euler trajectory (CFG 7.0, the pipeline's default)."""
    scorer = scorers["sd3"]
    pipe = load_pipeline(family_model_dirs["sd3"])
    x = torch.randn(1, *scorer.latent_shape, generator=torch.Generator().manual_seed(1))
    caption = CAPTIONS[0]
    cond, uncond = reference_outputs(pipe, "sd3", caption, x)
    first = float(magnitude.per_sample_l2(cond - uncond))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(50)
    guided = uncond + 7.0 * (cond - uncond)
    x1 = scheduler.step(guided, scheduler.timesteps[0], x, return_dict=False)[0]
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(caption, None, None, device="cpu")
        t = scheduler.timesteps[1].expand(1)
        v_c = pipe.transformer(
            hidden_states=x1, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled
        )[0]
        v_u = pipe.transformer(
            hidden_states=x1, timestep=t, encoder_hidden_states=negative, pooled_projections=negative_pooled
        )[0]
    second = float(magnitude.per_sample_l2(v_c - v_u))
    got = scorer.score([caption], steps=2, latents=x)[0]
    assert got == pytest.approx((first + second) / 2, rel=1e-4)


@pytest.fixture(scope="module")
def sd3_at_fixed_sigma(family_model_dirs):
    return Scorer.from_pretrained(family_model_dirs["sd3"], device="cpu", dtype="fp32", score_sigma=0.94)


def test_sd3_at_a_fixed_sigma_scores_after_one_euler_step_and_goes_on_down_the_sampler(
    family_model_dirs, scorers, sd3_at_fixed_sigma
):
    """--score-sigma 0.94: one CFG Euler step from x_T (sigma 1) to 0.94, scored there; steps=2 also scores the
    sampler's first sigma below 0.94."""
    from auditor.toy.flow_check import reference_velocity_magnitudes

    pipe = load_pipeline(family_model_dirs["sd3"])
    _, scheduler = first_timestep_and_scheduler(pipe, "sd3")
    below = float(scheduler.sigmas[scheduler.sigmas < 0.94][0])
    # The pipeline-level reference (its own encode_prompt and transformer, CFG 7.0 Euler) on x_T of seed 2.
    reference = reference_velocity_magnitudes(pipe, CAPTIONS[:1], seed=2, steps=3, sigmas=[1.0, 0.94, below])
    at_1, at_fixed, at_below = (float(v) for v in reference[0])
    x = sd3_at_fixed_sigma.initial_latents(1, 2)
    assert sd3_at_fixed_sigma.score(CAPTIONS[:1], latents=x)[0] == pytest.approx(at_fixed, rel=1e-4)
    two = sd3_at_fixed_sigma.score(CAPTIONS[:1], steps=2, latents=x)[0]
    assert two == pytest.approx((at_fixed + at_below) / 2, rel=1e-4)
    assert scorers["sd3"].score(CAPTIONS[:1], latents=x)[0] == pytest.approx(at_1, rel=1e-4)
    assert abs(at_fixed - at_1) > 1e-3 * at_1  # the flag changes what is scored
    # Batching, duplicates and the shared first unconditional row still hold on the longer trajectory.
    alone = np.array([sd3_at_fixed_sigma.score([c], generations=2)[0] for c in CAPTIONS])
    together = sd3_at_fixed_sigma.score(
        [CAPTIONS[3], CAPTIONS[0], CAPTIONS[0], *CAPTIONS[1:3]], generations=2
    )
    np.testing.assert_allclose(together, alone[[3, 0, 0, 1, 2]], rtol=1e-5, atol=1e-5)
    assert sd3_at_fixed_sigma.runtime["score_sigma"] == 0.94
    assert Scorer.from_pretrained(
        family_model_dirs["sd3"], device="cpu", dtype="fp32", score_sigma=1.0
    ).score(CAPTIONS[:1], latents=x)[0] == pytest.approx(at_1, rel=1e-5)


def test_explain_at_a_fixed_sigma_explains_the_magnitude_it_scores(sd3_at_fixed_sigma):
    from auditor.scoring.explain import explain

    caption = "a red cat sitting in a park"
    result = explain(sd3_at_fixed_sigma, caption, generations=2)
    expected = float(sd3_at_fixed_sigma.score([caption], generations=2)[0])
    assert result.magnitude == pytest.approx(expected, rel=1e-4)
    assert (result.significance > 0).all()


def test_explain_cli_takes_score_sigma_and_mitigate_does_not(family_model_dirs, sd3_at_fixed_sigma, capsys):
    from auditor.cli import main

    caption = "a red cat sitting in a park"
    model = str(family_model_dirs["sd3"])
    assert main(["explain", "--model", model, "--score-sigma", "0.94", "--json", caption]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["magnitude"] == pytest.approx(float(sd3_at_fixed_sigma.score([caption])[0]), rel=1e-4)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "mitigate",
                "--model",
                model,
                caption,
                "--target",
                "1",
                "--out",
                "e.safetensors",
                "--score-sigma",
                "0.9",
            ]
        )
    assert exit_info.value.code == 2 and "unrecognized arguments: --score-sigma" in capsys.readouterr().err


def test_a_fixed_sigma_is_refused_where_it_does_not_apply(
    family_model_dirs, tiny_model_dir, sd3_at_fixed_sigma
):
    from auditor.errors import ConfigError
    from auditor.scoring.mitigate import mitigate, sample_latents

    for folder in (tiny_model_dir, family_model_dirs["pixart-sigma"]):
        with pytest.raises(ConfigError, match=r"--score-sigma 0\.9 applies to flow-matching models .* Drop"):
            Scorer.from_pretrained(folder, device="cpu", dtype="fp32", score_sigma=0.9)
    with pytest.raises(ConfigError, match=r"score_sigma must be a number in \(0, 1\], got 0"):
        Scorer.from_pretrained(family_model_dirs["sd3"], device="cpu", dtype="fp32", score_sigma=0)
    with pytest.raises(ConfigError, match=r"steps must be an int in 1\.\.\d+, got 50"):
        sd3_at_fixed_sigma.score(["a cat"], steps=50)
    # mitigate and sampling run the model's own sampler from x_T, not the fixed-sigma trajectory.
    with pytest.raises(
        ConfigError, match=r"mitigate works at the sampler's first step .*\(drop --score-sigma\)"
    ):
        mitigate(sd3_at_fixed_sigma, "a cat", target=0.1)
    cond = sd3_at_fixed_sigma.condition_tokens(sd3_at_fixed_sigma.tokenize(["a cat"]))
    with pytest.raises(ConfigError, match="sampling works at the sampler's first step"):
        sample_latents(sd3_at_fixed_sigma, cond, sd3_at_fixed_sigma.initial_latents(1, 0))


def test_family_is_recorded_in_the_runtime(scorers):
    assert {name: scorers[name].runtime["family"] for name in FAMILIES} == {
        "sdxl": "sdxl", "sd3": "sd3", "sd3-no-t5": "sd3", "pixart-sigma": "pixart-sigma",
    }  # fmt: skip


def test_a_folder_without_model_index_is_sd(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model / "model_index.json").unlink()
    assert detect_layout(model).name == "sd"


def set_class_name(folder, class_name):
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = class_name
    (folder / "model_index.json").write_text(json.dumps(index))


def test_guidance_distilled_models_are_refused_with_the_reason(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    set_class_name(model, "FluxPipeline")
    with pytest.raises(ModelLoadError, match=r"FluxPipeline: a guidance-distilled model has no unconditional.*"
                       r"Supported pipelines: .*StableDiffusion3Pipeline"):  # fmt: skip
        Scorer.from_pretrained(model, device="cpu")


def test_unknown_pipelines_are_refused_with_the_supported_list(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    set_class_name(model, "KandinskyPipeline")
    with pytest.raises(
        ModelLoadError, match=r"KandinskyPipeline .*cannot score. Supported pipelines: .*PixArtSigma"
    ):
        check_model_dir(model)


def test_a_listed_component_missing_on_disk_is_named(family_model_dirs, tmp_path):
    model = shutil.copytree(family_model_dirs["sd3"], tmp_path / "m")
    shutil.rmtree(model / "text_encoder_3")
    with pytest.raises(
        ModelLoadError, match=r"missing text_encoder_3; it has: .*A StableDiffusion3Pipeline folder"
    ):
        check_model_dir(model)


def test_a_required_component_recorded_as_null_is_refused(family_model_dirs, tmp_path):
    model = shutil.copytree(family_model_dirs["sdxl"], tmp_path / "m")
    index = json.loads((model / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ModelLoadError, match="records text_encoder_2 as null, but a StableDiffusionXLPipeline needs"
    ):
        check_model_dir(model)


def test_pickle_only_transformer_weights_are_refused(family_model_dirs, tmp_path):
    model = shutil.copytree(family_model_dirs["pixart-sigma"], tmp_path / "m")
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.unlink()
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelLoadError, match=r"transformer has only pickle weights"):
        check_model_dir(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_reports_each_tokenizers_rows_and_the_score(family, scorers):
    from auditor.scoring.explain import explain

    scorer = scorers[family]
    caption = "a red cat sitting in a park"
    result = explain(scorer, caption, generations=2)
    assert result.magnitude == pytest.approx(float(scorer.score([caption], generations=2)[0]), rel=1e-4)
    assert 0 < len(result.tokens) == len(result.significance) == len(result.share)
    assert (result.significance > 0).all() and result.share.sum() == pytest.approx(1.0, rel=1e-5)
    # SD3 with T5 reports the T5 rows beside the CLIP rows; the other families have one tokenizer's rows.
    assert sorted(result.other) == (["t5"] if family == "sd3" else [])
    for other in result.other.values():
        assert 0 < len(other.tokens) == len(other.significance) and (other.significance > 0).all()


def test_explain_gradients_are_those_of_the_score(scorers):
    """Significance of a token = ||d score / d e_p[row]||: checked against central differences on PixArt's T5 rows."""
    from auditor.scoring.explain import explain

    scorer = scorers["pixart-sigma"]
    caption = "a blue bicycle"
    result = explain(scorer, caption)
    cond = scorer.condition_tokens(scorer.tokenize([caption]))
    x = scorer.initial_latents(1, 0)
    row = int(np.argmax(result.significance))
    step = 1e-2

    def score_with(dim: int, delta: float) -> float:
        embeds = cond.embeds.clone()
        embeds[0, row, dim] += delta
        return float(scorer.magnitudes(Conditioning(embeds, cond.pooled, cond.mask), x)[0])

    gradient = [
        (score_with(d, step) - score_with(d, -step)) / (2 * step) for d in range(cond.embeds.shape[-1])
    ]
    assert float(np.linalg.norm(gradient)) == pytest.approx(float(result.significance[row]), rel=2e-2)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "pixart-sigma"])
def test_mitigate_lowers_the_magnitude_of_the_familys_conditioning(family, scorers):
    from auditor.scoring.mitigate import mitigate

    scorer = scorers[family]
    caption = "a red cat sitting in a park"
    before = float(scorer.score([caption])[0])
    result = mitigate(scorer, caption, target=before / 2, lr=0.1, max_iters=20)
    assert result.magnitude_before == pytest.approx(before, rel=1e-4)
    assert result.magnitude_after < before * 0.9
    cond = scorer.condition_tokens(scorer.tokenize([caption]))
    optimised = Conditioning(result.prompt_embeds, result.pooled_prompt_embeds, cond.mask)
    assert float(scorer.magnitudes(optimised, scorer.initial_latents(1, 0))[0]) == pytest.approx(
        result.magnitude_after, rel=1e-4
    )
    assert (result.pooled_prompt_embeds is None) == (family == "pixart-sigma")


def test_mitigate_generate_is_refused_for_non_sd_families_before_any_work(
    family_model_dirs, tmp_path, capsys
):
    from auditor.cli import main

    args = ["mitigate", "--model", str(family_model_dirs["sdxl"]), "a red cat", "--target", "0.1"]
    assert main([*args, "--out", str(tmp_path / "e.safetensors"), "--generate", str(tmp_path / "x.png")]) == 2
    assert "--generate renders SD 1.x/2.x models only; this is a sdxl model" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists()


def test_mitigate_cli_saves_the_pooled_embedding_of_sd3(family_model_dirs, tmp_path):
    from safetensors import safe_open

    from auditor.cli import main

    out = tmp_path / "e.safetensors"
    args = [
        "mitigate",
        "--model",
        str(family_model_dirs["sd3"]),
        "a red cat",
        "--target",
        "0.1",
        "--max-iters",
        "2",
    ]
    assert main([*args, "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as fh:
        assert sorted(fh.keys()) == ["pooled_prompt_embeds", "prompt_embeds"]
        assert fh.get_tensor("pooled_prompt_embeds").shape == (1, 64)


def threshold_from(content: dict):
    from auditor.pipeline.plan import ThresholdChoice

    return ThresholdChoice(0.5, {"kind": "file", "path": "t.json", "content": {"threshold": 0.5, **content}})


def test_a_threshold_file_from_another_family_or_model_is_warned(caplog):
    from auditor.pipeline.plan import warn_if_calibrated_elsewhere

    with caplog.at_level("WARNING"):
        warn_if_calibrated_elsewhere(
            threshold_from({"model_family": "sd", "model_fingerprint": "a" * 64}), "sd3", "b" * 64
        )
    assert "calibrated on a sd model, this audit runs a sd3 model: thresholds never transfer" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_if_calibrated_elsewhere(
            threshold_from({"model_family": "sd3", "model_fingerprint": "a" * 64}), "sd3", "b" * 64
        )
    assert "calibrated on another model (fingerprint aaaaaaaaaaaa" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_if_calibrated_elsewhere(
            threshold_from({"model_family": "sd3", "model_fingerprint": "b" * 64}), "sd3", "b" * 64
        )
        # A file written before families existed was calibrated on an SD model; before score_sigma, at sigma 1.
        warn_if_calibrated_elsewhere(
            threshold_from({"model_fingerprint": "b" * 64, "steps": 1}),
            "sd",
            "b" * 64,
            {"steps": 1, "score_sigma": None},
        )
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        warn_if_calibrated_elsewhere(
            threshold_from(
                {"model_family": "sd3", "model_fingerprint": "b" * 64, "steps": 1, "generations": 1}
            ),
            "sd3",
            "b" * 64,
            {"generations": 4, "steps": 1, "score_sigma": 0.94},
        )
    assert (
        "t.json was calibrated with other score options (generations 1 there, 4 here, score_sigma None "
        in (caplog.text)
    )
