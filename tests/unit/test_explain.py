"""explain(): per-sample token significance against a hand-written autograd reference and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from auditor import Scorer
from auditor.errors import ConfigError, InputDataError
from auditor.scoring import magnitude
from auditor.scoring.explain import TokenSignificance, explain

CAPTION = "a red cat sitting in a park"


def encode_caption(scorer: Scorer, caption: str) -> torch.Tensor:
    with torch.no_grad():
        return scorer.encode_tokens(scorer.tokenize([caption])).float()


def unet_eps(scorer: Scorer, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    out = scorer.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
    return magnitude.to_epsilon(out, x, int(t), scorer.scheduler).float()


def reference_significance(
    scorer: Scorer, caption: str, generations: int, steps: int, seed: int
) -> np.ndarray:
    """One generation and one step at a time: grad of that sample's norm, L2 over D, mean over (k, s)."""
    e_p = encode_caption(scorer, caption)
    e_0 = scorer.empty_embedding().float()
    total = torch.zeros(e_p.shape[1])
    for k in range(generations):
        x = scorer.initial_latents(generations, seed)[k : k + 1].clone()
        for index, t in enumerate(scorer.timesteps[:steps]):
            leaf = e_p.clone().requires_grad_(True)
            with torch.enable_grad():
                m = (unet_eps(scorer, x, t, leaf) - unet_eps(scorer, x, t, e_0)).flatten().norm()
                (grad,) = torch.autograd.grad(m, [leaf])
            total += grad[0].norm(dim=-1)
            if index + 1 < steps:
                with torch.no_grad():
                    raw_u = scorer.unet(x, t, encoder_hidden_states=e_0, return_dict=False)[0]
                    raw_c = scorer.unet(x, t, encoder_hidden_states=e_p, return_dict=False)[0]
                    x = scorer.scheduler.step(raw_u + 7.5 * (raw_c - raw_u), t, x, return_dict=False)[0]
    return (total / (generations * steps)).numpy()


@pytest.mark.parametrize(("generations", "steps"), [(1, 1), (2, 1), (2, 3)])
def test_significance_matches_per_sample_autograd_reference(tiny_scorer, generations, steps):
    result = explain(tiny_scorer, CAPTION, generations=generations, steps=steps, seed=3)
    expected = reference_significance(tiny_scorer, CAPTION, generations, steps, seed=3)
    n = len(result.tokens)
    np.testing.assert_allclose(result.significance, expected[1 : 1 + n], rtol=1e-4, atol=1e-7)
    assert result.significance.dtype == np.float32


def test_significance_is_the_directional_derivative_along_the_gradient(tiny_scorer):
    """Finite differences: moving e_p[i] by h along its unit gradient changes m by h * significance[i]."""
    result = explain(tiny_scorer, CAPTION, generations=1, steps=1, seed=0)
    e_p = encode_caption(tiny_scorer, CAPTION)
    x = tiny_scorer.initial_latents(1, 0)
    t = tiny_scorer.timesteps[0]
    eps_0 = unet_eps(tiny_scorer, x, t, tiny_scorer.empty_embedding().float())

    def m(e: torch.Tensor) -> float:
        with torch.no_grad():
            return float((unet_eps(tiny_scorer, x, t, e) - eps_0).double().flatten().norm())

    leaf = e_p.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad((unet_eps(tiny_scorer, x, t, leaf) - eps_0).flatten().norm(), [leaf])
    h = 1e-2
    for token_index in (0, 2, len(result.tokens) - 1):
        position = 1 + token_index
        direction = torch.zeros_like(e_p)
        direction[0, position] = grad[0, position] / grad[0, position].norm()
        slope = (m(e_p + h * direction) - m(e_p - h * direction)) / (2 * h)
        assert slope == pytest.approx(float(result.significance[token_index]), rel=2e-2)


@pytest.mark.parametrize(("generations", "steps"), [(1, 1), (2, 1), (2, 4)])
def test_magnitude_equals_the_score_on_the_correct_cfg_trajectory(tiny_scorer, generations, steps):
    result = explain(tiny_scorer, CAPTION, generations=generations, steps=steps, seed=1)
    score = tiny_scorer.score([CAPTION], generations=generations, steps=steps, seed=1)[0]
    assert result.magnitude == pytest.approx(float(score), rel=1e-5)


def test_multi_step_does_not_follow_the_reference_swapped_guidance(tiny_scorer):
    """The reference steps with eps_p + 7.5 (eps_0 - eps_p) (guidance -6.5); the step-2 magnitude must differ."""
    e_p, e_0 = encode_caption(tiny_scorer, CAPTION), tiny_scorer.empty_embedding().float()
    x = tiny_scorer.initial_latents(1, 0)
    t0, t1 = tiny_scorer.timesteps[:2]
    with torch.no_grad():
        raw_u = tiny_scorer.unet(x, t0, encoder_hidden_states=e_0, return_dict=False)[0]
        raw_c = tiny_scorer.unet(x, t0, encoder_hidden_states=e_p, return_dict=False)[0]
        swapped_x = tiny_scorer.scheduler.step(raw_c + 7.5 * (raw_u - raw_c), t0, x, return_dict=False)[0]
        swapped_m1 = float(
            (unet_eps(tiny_scorer, swapped_x, t1, e_p) - unet_eps(tiny_scorer, swapped_x, t1, e_0)).norm()
        )
    m0 = explain(tiny_scorer, CAPTION, steps=1).magnitude
    two_step = explain(tiny_scorer, CAPTION, steps=2).magnitude
    swapped_two_step = (m0 + swapped_m1) / 2
    assert abs(two_step - swapped_two_step) > 1e-3 * two_step


def test_tokens_drop_specials_and_follow_the_tokenizer(tiny_scorer):
    result = explain(tiny_scorer, CAPTION)
    assert isinstance(result, TokenSignificance)
    assert result.tokens == tiny_scorer.tokenizer.tokenize(CAPTION)
    assert result.tokens == tiny_scorer.tokenizer.convert_ids_to_tokens(result.token_ids.tolist())
    assert len(result.significance) == len(result.share) == len(result.tokens) == 7
    assert result.share.sum() == pytest.approx(1.0, abs=1e-5)
    assert (result.significance > 0).all()
    assert not result.truncated
    assert sorted(result.ranking()) == list(range(7))
    assert result.significance[result.ranking()[0]] == result.significance.max()


def test_long_caption_is_cut_at_the_model_max_length(tiny_scorer):
    caption = " ".join(["cat"] * 200)
    result = explain(tiny_scorer, caption)
    assert len(result.tokens) == tiny_scorer.max_length - 2
    assert result.truncated


def test_vprediction_model_magnitude_matches_score(tiny_vpred_model_dir):
    scorer = Scorer.from_pretrained(tiny_vpred_model_dir, device="cpu", dtype="fp32")
    result = explain(scorer, CAPTION, generations=2, steps=2)
    assert result.magnitude == pytest.approx(
        float(scorer.score([CAPTION], generations=2, steps=2)[0]), rel=1e-5
    )
    expected = reference_significance(scorer, CAPTION, 2, 2, seed=0)
    np.testing.assert_allclose(
        result.significance, expected[1 : 1 + len(result.tokens)], rtol=1e-4, atol=1e-7
    )


def test_works_inside_an_outer_no_grad_block(tiny_scorer):
    with torch.no_grad():
        inside = explain(tiny_scorer, CAPTION)
    np.testing.assert_array_equal(inside.significance, explain(tiny_scorer, CAPTION).significance)


@pytest.mark.parametrize("caption", ["", "   "])
def test_empty_caption_has_nothing_to_explain(tiny_scorer, caption):
    with pytest.raises(InputDataError, match="nothing to explain"):
        explain(tiny_scorer, caption)


def test_non_string_caption_is_rejected(tiny_scorer):
    with pytest.raises(InputDataError, match="must be a str"):
        explain(tiny_scorer, 42)


@pytest.mark.parametrize(
    ("options", "message"), [({"generations": 0}, "generations"), ({"steps": 51}, "steps")]
)
def test_bad_options_are_config_errors(tiny_scorer, options, message):
    with pytest.raises(ConfigError, match=message):
        explain(tiny_scorer, CAPTION, **options)


def test_cli_prints_a_bar_chart(tiny_model_dir, capsys):
    from auditor.cli import main

    assert main(["explain", "--model", str(tiny_model_dir), CAPTION, "--generations", "2"]) == 0
    out = capsys.readouterr().out
    assert "magnitude" in out and "significance" in out and "share" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row.split()[1] for row in rows] == CAPTION.split()
    assert sum(float(row.split()[-1].rstrip("%")) for row in rows) == pytest.approx(100, abs=0.5)
    assert any("█" in row for row in rows)


def test_cli_json_matches_the_library(tiny_model_dir, tiny_scorer, capsys):
    import json

    from auditor.cli import main

    assert (
        main(["explain", "--model", str(tiny_model_dir), CAPTION, "--steps", "2", "--seed", "5", "--json"])
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    expected = explain(tiny_scorer, CAPTION, steps=2, seed=5)
    assert row["tokens"] == expected.tokens
    np.testing.assert_allclose(row["significance"], expected.significance, rtol=1e-5)
    assert row["magnitude"] == pytest.approx(expected.magnitude, rel=1e-5)


def test_cli_empty_caption_is_an_error_message(tiny_model_dir, capsys):
    from auditor.cli import main

    assert main(["explain", "--model", str(tiny_model_dir), ""]) == 2
    assert "nothing to explain" in capsys.readouterr().err


@pytest.mark.slow
def test_toy_trigger_token_ranks_first(toy_model_dir):
    from auditor.toy.manifest import load_manifest

    scorer = Scorer.from_pretrained(toy_model_dir, device="cpu", dtype="fp32")
    manifest = load_manifest(toy_model_dir)
    firsts = []
    for caption, trigger in zip(manifest.memorized, manifest.trigger_tokens, strict=True):
        result = explain(scorer, caption)
        assert trigger in result.tokens
        firsts.append(result.tokens[result.ranking()[0]] == trigger)
    rate = float(np.mean(firsts))
    print(f"trigger ranked first for {sum(firsts)}/{len(firsts)} memorized captions ({rate:.0%})")
    assert rate >= 0.9
