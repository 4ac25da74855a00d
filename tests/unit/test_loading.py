"""Model loading: folder checks, safetensors-only rule, fingerprints, reference forms."""

from __future__ import annotations

import shutil

import pytest

from auditor import Scorer
from auditor.errors import ModelLoadError
from auditor.scoring.loading import check_model_dir, fingerprint_model, resolve_model_dir


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_components_are_named(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(model / "unet")
    shutil.rmtree(model / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"missing unet, tokenizer; it has: .*scheduler"):
        Scorer.from_pretrained(model, device="cpu")


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    for weights in (model / "unet").glob("*.safetensors"):
        weights.unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(
        ModelLoadError, match="only pickle weights .*diffusion_pytorch_model.bin.*safetensors only"
    ):
        check_model_dir(model)


def test_no_weights_at_all(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    for weights in (model / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="text_encoder has no \\*.safetensors weights"):
        check_model_dir(model)


def test_model_reference_forms(tiny_model_dir, tmp_path):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir
    assert resolve_model_dir(f"file://{tiny_model_dir}") == tiny_model_dir
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_dir(tiny_model_dir / "model_index.json")
    with pytest.raises(ModelLoadError, match="neither a local folder"):
        resolve_model_dir(str(tmp_path / "nope" / "deeper"))


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelLoadError, match="could not fetch hub model 'someone/sd-model'.*local path or s3://"
    ):
        resolve_model_dir("someone/sd-model")


def test_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m")
    before = fingerprint_model(model)
    assert before == fingerprint_model(tiny_model_dir)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert fingerprint_model(model) != before
