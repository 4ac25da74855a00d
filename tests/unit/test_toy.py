"""The toy memorizing model: it really memorizes, the score detects it, random weights do not, and it is a
loadable, reproducible, cached diffusers folder. The slow tests share the session's `toy_model_dir`."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from auditor.cli import main
from auditor.errors import ConfigError, InputDataError
from auditor.report.metrics import detection_metrics
from auditor.scoring import Scorer
from auditor.toy import models
from auditor.toy.data import ToyDataSpec
from auditor.toy.manifest import load_manifest
from auditor.toy.train import PRESETS, ToyTrainSpec, build_toy_model, read_build_info, train_toy_model

# A few seconds to train: for behaviour of the trainer, not for memorization.
MICRO = ToyTrainSpec(
    model=dataclasses.replace(models.MICRO, norm_num_groups=8),
    data=ToyDataSpec(num_memorized=4, num_seen_once_eval=4, num_held_out=6),
    steps=4,
    batch_size=8,
    memorized_per_batch=2,
    warmup_steps=1,
    check_samples=2,
)


def weights(model_dir) -> dict[str, torch.Tensor]:
    return {
        **{
            f"unet.{k}": v
            for k, v in load_file(model_dir / "unet/diffusion_pytorch_model.safetensors").items()
        },
        **{f"text.{k}": v for k, v in load_file(model_dir / "text_encoder/model.safetensors").items()},
    }


# Fast: the trainer ----------------------------------------------------------------------------------------------
def test_training_is_reproducible(tmp_path):
    first, _ = train_toy_model(tmp_path / "a", MICRO, seed=3)
    second, _ = train_toy_model(tmp_path / "b", MICRO, seed=3)
    other, _ = train_toy_model(tmp_path / "c", MICRO, seed=4)
    a, b, c = weights(first), weights(second), weights(other)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert load_manifest(first).memorized == load_manifest(second).memorized
    assert load_manifest(first).memorized != load_manifest(other).memorized


def test_sample_filter_masks_the_loss_and_skips_empty_steps(tmp_path):
    calls = []

    def drop_all(unet, noisy, timesteps, cond_pred, empty_embeds):
        calls.append(
            (noisy.shape, timesteps.shape, cond_pred.shape, empty_embeds.shape, cond_pred.requires_grad)
        )
        return torch.zeros(noisy.shape[0], dtype=torch.bool)

    model_dir, result = train_toy_model(tmp_path / "none", MICRO, seed=0, sample_filter=drop_all)
    assert result.skipped_steps == MICRO.steps and result.kept_samples == 0
    assert len(calls) == MICRO.steps
    noisy_shape, t_shape, pred_shape, empty_shape, grad = calls[0]
    assert noisy_shape == pred_shape == (8, 4, 8, 8) and t_shape == (8,) and not grad
    assert empty_shape == (8, 77, 16)
    # Nothing was kept, so the saved UNet is its seeded initialisation.
    from transformers import CLIPTokenizer

    vocab_size = len(CLIPTokenizer.from_pretrained(model_dir / "tokenizer"))
    torch.manual_seed(0)
    models.build_text_encoder(MICRO.model, vocab_size=vocab_size)
    untrained = models.build_unet(MICRO.model).state_dict()
    saved = load_file(model_dir / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], untrained[k]) for k in untrained)

    def keep_first_half(unet, noisy, timesteps, cond_pred, empty_embeds):
        keep = torch.zeros(noisy.shape[0], dtype=torch.bool)
        keep[: noisy.shape[0] // 2] = True
        return keep

    _, result = train_toy_model(tmp_path / "half", MICRO, seed=0, sample_filter=keep_first_half)
    assert result.skipped_steps == 0 and result.kept_samples == result.total_samples // 2


def test_magnitude_filter_plugs_into_the_trainer(tmp_path):
    from auditor.training import MagnitudeFilter

    keep_all = MagnitudeFilter(1e9)
    _, result = train_toy_model(tmp_path / "m", MICRO, seed=0, sample_filter=keep_all)
    assert result.kept_samples == result.total_samples == MICRO.steps * MICRO.batch_size


def test_build_caches_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "toy"
    _, info = build_toy_model(out, MICRO, seed=0, check=False)
    stamp = (out / "toy_build.json").stat().st_mtime_ns
    _, again = build_toy_model(out, MICRO, seed=0, check=False)
    assert again == info and (out / "toy_build.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other settings; pass --force"):
        build_toy_model(out, MICRO, seed=1, check=False)
    _, forced = build_toy_model(out, MICRO, seed=1, check=False, force=True)
    assert forced["settings"]["seed"] == 1 and read_build_info(out) == forced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a complete toy build"):
        build_toy_model(foreign, MICRO, seed=0, check=False)
    assert not [p for p in tmp_path.iterdir() if ".building-" in p.name]


def test_unknown_preset_and_missing_manifest(tmp_path):
    with pytest.raises(ConfigError, match="not one of full, test"):
        build_toy_model(tmp_path / "x", "huge")
    with pytest.raises(InputDataError, match="not a toy model folder"):
        load_manifest(tmp_path)


# Slow: the trained test preset ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_manifest_describes_the_training_data(toy_model_dir):
    from transformers import CLIPTokenizer

    manifest = load_manifest(toy_model_dir)
    spec = PRESETS["test"]
    tokenizer = CLIPTokenizer.from_pretrained(toy_model_dir / "tokenizer")
    assert len(manifest.memorized) == spec.data.num_memorized
    assert manifest.memorized_latents.shape == (spec.data.num_memorized, 4, 8, 8)
    assert manifest.seen_once_latents.shape == (len(manifest.seen_once), 4, 8, 8)
    assert len(set(manifest.triggers)) == len(manifest.triggers)
    for caption, trigger, token in zip(
        manifest.memorized, manifest.triggers, manifest.trigger_tokens, strict=True
    ):
        assert trigger in caption.split(" ")
        assert tokenizer.tokenize(trigger) == [token]
        assert token in tokenizer.tokenize(caption)
    assert min(manifest.memorized_repeats) >= 100
    held_out, seen, memorized = set(manifest.held_out), set(manifest.seen_once), set(manifest.memorized)
    assert not held_out & seen and not held_out & memorized and not seen & memorized
    assert not any(t in c for c in manifest.held_out + manifest.seen_once for t in manifest.triggers)


@pytest.mark.slow
def test_memorized_captions_reproduce_their_training_latent(toy_model_dir):
    check = read_build_info(toy_model_dir)["memorization_check"]
    assert check["memorized_cosine_mean"] > 0.6
    assert check["memorized_cosine_mean"] > check["seen_once_cosine_mean"] + 0.4


@pytest.mark.slow
def test_trained_toy_reaches_the_detection_targets(toy_model_dir):
    manifest = load_manifest(toy_model_dir)
    scorer = Scorer.from_pretrained(toy_model_dir, device="cpu", dtype="fp32")
    for generations, target in ((1, 0.95), (4, 0.99)):
        positive = scorer.score(manifest.memorized, generations=generations)
        for negatives in (manifest.held_out, manifest.seen_once):
            metrics = detection_metrics(positive, scorer.score(negatives, generations=generations))
            assert metrics.auc >= target, (generations, metrics)


@pytest.mark.slow
def test_random_weights_do_not_separate(toy_model_dir, tmp_path):
    from transformers import CLIPTokenizer

    spec = PRESETS["test"].model
    tokenizer = CLIPTokenizer.from_pretrained(toy_model_dir / "tokenizer")
    torch.manual_seed(0)
    random_dir = models.save_sd_folder(
        tmp_path / "random",
        tokenizer,
        models.build_text_encoder(spec, vocab_size=len(tokenizer)),
        models.build_unet(spec),
        models.build_vae(spec),
        dict(models.SD_V1_SCHEDULER),
    )
    manifest = load_manifest(toy_model_dir)
    scorer = Scorer.from_pretrained(random_dir, device="cpu", dtype="fp32")
    positive = scorer.score(manifest.memorized, generations=4)
    for negatives in (manifest.held_out, manifest.seen_once):
        auc = detection_metrics(positive, scorer.score(negatives, generations=4)).auc
        assert 0.3 <= auc <= 0.7, auc


@pytest.mark.slow
def test_folder_loads_with_stable_diffusion_pipeline(toy_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_model_dir, local_files_only=True)
    manifest = load_manifest(toy_model_dir)
    scale = pipe.vae_scale_factor
    out = pipe(
        manifest.memorized[0],
        num_inference_steps=2,
        height=8 * scale,
        width=8 * scale,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 4, 8, 8)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"


@pytest.mark.slow
def test_evaluate_cli_on_the_toy(toy_model_dir, capsys):
    code = main(
        ["evaluate", "--model", str(toy_model_dir), "--generations", "1", "--steps", "1", "--json"]
        + ["--similarity-samples", "8"]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rows = [line for line in lines if "auc" in line]
    assert {row["negatives"] for row in rows} == {"held-out", "seen-once"}
    assert all(row["auc"] >= 0.95 for row in rows)
    check = [line["memorization_check"] for line in lines if "memorization_check" in line][0]
    assert check["memorized_mean"] > check["seen_once_mean"]


def test_evaluate_cli_with_labelled_files(tiny_model_dir, tmp_path, capsys):
    positives, negatives = tmp_path / "mem.txt", tmp_path / "clean.txt"
    positives.write_text("a red cat sitting in a park\nmona lisa by leonardo\n")
    negatives.write_text("\n".join(f"a {w} dog by the sea" for w in ("old", "new", "tiny", "huge")) + "\n")
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--positives",
            str(positives),
            "--negatives",
            str(negatives),
        ]
        + ["--generations", "1", "2", "--steps", "1"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("| clean.txt |") == 2
    code = main(["evaluate", "--model", str(tiny_model_dir), "--positives", str(positives)])
    assert code == 2
    assert "pass both --positives and --negatives" in capsys.readouterr().err


def test_evaluate_cli_needs_a_manifest_without_files(tiny_model_dir, capsys):
    assert main(["evaluate", "--model", str(tiny_model_dir)]) == 2
    assert "not a toy model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_puts_memorized_captions_on_top(toy_model_dir, tmp_path, capsys):
    from auditor.toy import demo

    model_dir = tmp_path / "model"
    shutil.copytree(toy_model_dir, model_dir)
    code = demo.main(
        ["--model-dir", str(model_dir), "--out", str(tmp_path / "out"), "--preset", "test", "--rows", "400"]
        + ["--local"]
    )
    assert code == 0
    out = capsys.readouterr().out
    n = len(load_manifest(toy_model_dir).memorized)
    assert f"the {n} highest-scoring distinct captions hold {n} of the {n} memorized ones" in out
    assert (tmp_path / "out" / "threshold.json").is_file()
    # The audit layout (one hive partition per input file) and its HTML report, whose path the demo prints last.
    scores = list((tmp_path / "out" / "audit" / "scores").glob("shard=*/*.parquet"))
    assert len(scores) == 3
    report = tmp_path / "out" / "audit" / "report.html"
    assert report.is_file() and out.rstrip().splitlines()[-1].startswith(f"report: {report.resolve()}")
    assert np.isfinite(json.loads((tmp_path / "out" / "threshold.json").read_text())["threshold"])
