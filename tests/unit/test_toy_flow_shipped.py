"""The shipped flow-matching toy (SD3-shaped, `auditor toy-model path --family sd3`): the SD3 family's Scorer
detects its memorized captions, its scores equal the pipeline-level reference, and sampling reproduces them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditor import Scorer
from auditor.report.metrics import detection_metrics
from auditor.toy.flow_check import (
    FIXED_SIGMA,
    load_flow_pipeline,
    reference_velocity_magnitudes,
    sample_with_pipeline,
)
from auditor.toy.manifest import load_manifest
from auditor.toy.shipped import shipped_model_dir


@pytest.fixture(scope="module")
def flow_toy():
    folder = shipped_model_dir("sd3")
    return folder, Scorer.from_pretrained(folder, device="cpu", dtype="fp32"), load_manifest(folder)


def test_scorer_detects_the_memorized_captions_of_the_flow_toy(flow_toy):
    _, scorer, manifest = flow_toy
    assert scorer.family_name == "sd3"
    memorized = scorer.score(list(manifest.memorized))
    for name, negatives in (("held-out", manifest.held_out), ("seen-once", manifest.seen_once)):
        metrics = detection_metrics(memorized, scorer.score(list(negatives)), fpr=0.01)
        assert metrics.auc >= 0.95 and metrics.tpr_at_fpr >= 0.9, (name, metrics)


def test_scorer_equals_the_pipeline_reference_on_the_flow_toy(flow_toy):
    folder, scorer, manifest = flow_toy
    captions = [*manifest.memorized[:3], *manifest.held_out[:3], ""]
    reference = reference_velocity_magnitudes(
        load_flow_pipeline(folder), captions, generations=2, steps=2
    ).numpy()
    np.testing.assert_allclose(scorer.score(captions, generations=2), reference[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        scorer.score(captions, generations=2, steps=2), reference.mean(axis=1), rtol=1e-4, atol=1e-5
    )


def test_score_sigma_scores_what_the_detection_benchmark_measured_and_detects(flow_toy):
    """`--score-sigma 0.94` is bench/detection_flow.py's fixed-sigma column: the reference's second point of the
    trajectory [1, 0.94]; it detects on the flow toy too (BENCHMARKS.md §3b)."""
    folder, _, manifest = flow_toy
    scorer = Scorer.from_pretrained(folder, device="cpu", dtype="fp32", score_sigma=FIXED_SIGMA)
    captions = [*manifest.memorized[:3], *manifest.held_out[:3]]
    reference = reference_velocity_magnitudes(
        load_flow_pipeline(folder), captions, generations=2, steps=2, sigmas=[1.0, FIXED_SIGMA]
    ).numpy()
    np.testing.assert_allclose(scorer.score(captions, generations=2), reference[:, 1], rtol=1e-4, atol=1e-5)
    memorized = scorer.score(list(manifest.memorized))
    metrics = detection_metrics(memorized, scorer.score(list(manifest.held_out)), fpr=0.01)
    assert metrics.auc >= 0.95 and metrics.tpr_at_fpr >= 0.9, metrics


def test_evaluate_cli_at_a_fixed_sigma_reports_it(flow_toy, capsys):
    from auditor.cli import main

    folder, _, _ = flow_toy
    argv = ["evaluate", "--model", str(folder), "--score-sigma", "0.94", "--steps", "1", "--no-similarity"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "scored at sigma 0.94" in out and "| held-out | 1 | 1 |" in out


def test_euler_sampling_from_noise_reproduces_memorized_training_latents(flow_toy):
    folder, _, manifest = flow_toy
    samples = sample_with_pipeline(load_flow_pipeline(folder), list(manifest.memorized[:8]))
    latents = torch.as_tensor(np.asarray(manifest.memorized_latents[:8]))
    cosine = torch.nn.functional.cosine_similarity(samples.flatten(1), latents.flatten(1).float())
    assert float(cosine.mean()) >= 0.9, cosine
