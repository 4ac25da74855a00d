"""What keeps auditor working at the lower bounds of pyproject.toml (.ci/lower_bounds.sh runs it there too): the pins
the check installs, the Ray keywords, the tokenizer and text-encoder fallbacks for folders written by newer versions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors.torch import save_file

from auditor.errors import ModelLoadError
from auditor.pipeline import ray_compat
from auditor.scoring import loading
from auditor.scoring.tokens import (
    PAIR_MERGES_ERROR,
    load_tokenizer,
    tokenizer_from_pretrained,
    tokenizer_with_string_merges,
)
from auditor.toy.shipped import shipped_model_dir

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a photo of a cat", "a modern sun dancing in the snow, poster skajeash", ""]


def min_requirements():
    spec = importlib.util.spec_from_file_location("min_requirements", ROOT / ".ci" / "min_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pins_are_the_declared_lower_bounds_with_extras_and_markers():
    pin = min_requirements().pin_lower_bound
    assert pin("ray[default,data]>=2.50") == "ray[data,default]==2.50"
    assert (
        pin("backports.zstd>=1.0; python_version < '3.14'") == 'backports.zstd==1.0; python_version < "3.14"'
    )


def test_every_dependency_gets_a_pin(capsys):
    assert min_requirements().main(["test", "--only", "pytest", "--override", "torch==2.13.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(lines) == len(declared) + 1 and lines[0] == "torch==2.13.0", lines
    assert all("==" in line and ">=" not in line for line in lines), lines


@pytest.mark.parametrize("spec", ["boto3", "ray>=2.50,>=2.51", "numpy<3"])
def test_a_requirement_without_one_lower_bound_is_refused(spec):
    with pytest.raises(SystemExit, match="lower bounds .* needs exactly one"):
        min_requirements().pin_lower_bound(spec)


def test_an_override_must_name_a_dependency():
    with pytest.raises(SystemExit, match="--override names no requirement of pyproject.toml: torchx"):
        min_requirements().main(["--override", "torchx==1.0"])


def test_before_ray_2_51_pool_sizes_go_through_concurrency(monkeypatch):
    monkeypatch.setattr(ray_compat, "POOL_STRATEGIES_PUBLIC", False)
    monkeypatch.setattr(ray_compat, "ROW_COUNT_HINT", False)
    assert ray_compat.actor_pool(3) == ray_compat.task_pool(3) == {"concurrency": 3}
    assert ray_compat.keeps_row_count() == {}


def test_ray_keywords_are_parameters_of_the_installed_map_batches():
    """Not swallowed by map_batches' **ray_remote_args (where Ray 2.50 put udf_modifying_row_count, and failed)."""
    import inspect

    import ray.data

    parameters = inspect.signature(ray.data.Dataset.map_batches).parameters
    assert hasattr(ray.data, "TaskPoolStrategy") == ray_compat.POOL_STRATEGIES_PUBLIC
    for keywords in (ray_compat.actor_pool(3), ray_compat.task_pool(2), ray_compat.keeps_row_count()):
        assert set(keywords) <= {name for name in parameters if name != "ray_remote_args"}, keywords
    pool = ray_compat.actor_pool(3).get("compute")
    assert pool is None or (
        isinstance(pool, ray.data.ActorPoolStrategy) and pool.min_size == pool.max_size == 3
    )


@pytest.mark.parametrize(
    "version, keyword", [("4.40.2", "torch_dtype"), ("4.56.0", "dtype"), ("5.24.0", "dtype")]
)
def test_the_dtype_keyword_follows_the_installed_transformers(monkeypatch, version, keyword):
    monkeypatch.setattr(loading.metadata, "version", lambda name: version)
    assert loading.text_dtype_kwarg() == keyword


@pytest.mark.parametrize("family, folder", [("sd", "tokenizer"), ("sd3", "tokenizer_2")])
def test_string_merges_tokenize_as_the_shipped_tokenizer(family, folder):
    path = shipped_model_dir(family) / folder
    shipped = load_tokenizer(path)
    rewritten = tokenizer_with_string_merges(path / "tokenizer.json")
    rewritten.no_padding()  # the file pads to the model's length; transformers pads only when asked
    for caption in CAPTIONS:
        assert rewritten.encode(caption).ids == shipped(caption).input_ids, caption


class TokenizerClass:
    """A tokenizer class that fails as tokenizers < 0.20 does on pair merges, until given a tokenizer object."""

    def __init__(self, error: str):
        self.error, self.calls = error, []

    def from_pretrained(self, folder, **kwargs):
        self.calls.append(kwargs)
        if "tokenizer_object" not in kwargs:
            raise Exception(self.error)
        return kwargs["tokenizer_object"]


def test_a_tokenizer_that_cannot_parse_pair_merges_gets_them_as_strings():
    cls = TokenizerClass(f"data did not match any variant of {PAIR_MERGES_ERROR} at line 3732 column 3")
    tokenizer = tokenizer_from_pretrained(cls, shipped_model_dir() / "tokenizer")
    assert len(cls.calls) == 2 and tokenizer.encode("a photo of a cat").ids


def test_other_tokenizer_errors_are_not_swallowed():
    with pytest.raises(Exception, match="expected value at line 1"):
        tokenizer_from_pretrained(
            TokenizerClass("expected value at line 1"), shipped_model_dir() / "tokenizer"
        )


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.text_model = torch.nn.Linear(2, 2)


def test_unprefixed_text_weights_are_loaded(tmp_path, caplog):
    saved = {"weight": torch.arange(4.0).reshape(2, 2), "bias": torch.tensor([5.0, 6.0])}
    save_file(saved, tmp_path / "model.safetensors")
    encoder = Encoder()
    info = {"missing_keys": ["text_model.weight", "text_model.bias"], "unexpected_keys": ["weight", "bias"]}
    with caplog.at_level("INFO", logger=loading.__name__):
        loading.load_unprefixed_text_weights(encoder, tmp_path, info)
    assert torch.equal(encoder.text_model.weight, saved["weight"]) and torch.equal(
        encoder.text_model.bias, saved["bias"]
    )
    # transformers 4 has just warned "newly initialized": the log says the weights were loaded after all.
    assert "loaded 2 weights saved without the `text_model.` prefix" in caplog.text


def test_nothing_missing_leaves_the_encoder_alone(tmp_path):
    encoder = Encoder()
    before = encoder.text_model.weight.clone()
    loading.load_unprefixed_text_weights(encoder, tmp_path, {"missing_keys": [], "unexpected_keys": ["x"]})
    assert torch.equal(encoder.text_model.weight, before)


def test_other_missing_weights_fail_instead_of_scoring_with_random_ones(tmp_path):
    info = {"missing_keys": ["text_model.weight"], "unexpected_keys": ["encoder.weight"]}
    with pytest.raises(ModelLoadError, match="transformers left 1 weights of Encoder uninitialised"):
        loading.load_unprefixed_text_weights(Encoder(), tmp_path, info)
