"""Loading a model folder from S3 (moto server on 127.0.0.1) through s3fs, cached locally once."""

from __future__ import annotations

import pytest
import s3fs

from auditor import Scorer
from auditor.errors import ModelLoadError
from tests.scores_close import assert_scores_close

pytestmark = pytest.mark.integration


# Files of the SD 1.5 repository that scoring never loads: the copy must leave them in the bucket.
EXTRAS = (
    "v1-5-pruned.safetensors",
    "README.md",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "safety_checker/model.safetensors",
    "feature_extractor/preprocessor_config.json",
)


def test_scorer_loads_from_s3_and_caches(s3_endpoint, micro_model_dir, micro_scorer, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDITOR_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir("models-bucket")
    fs.put(str(micro_model_dir) + "/", "models-bucket/sd/micro/", recursive=True)
    for relative in EXTRAS:
        fs.pipe(f"models-bucket/sd/micro/{relative}", b"not a model file: copying it is the bug")
    options = {"endpoint_url": s3_endpoint}
    remote = Scorer.from_pretrained("s3://models-bucket/sd/micro", device="cpu", storage_options=options)
    captions = ["a red cat", "an old castle at night"]
    assert_scores_close(remote.score(captions), micro_scorer.score(captions))
    assert remote.fingerprint == micro_scorer.fingerprint
    copied = {p.relative_to(remote.components.root).as_posix() for p in remote.components.root.rglob("*")}
    assert not copied & set(EXTRAS) and "vae/diffusion_pytorch_model.safetensors" not in copied
    assert "unet/diffusion_pytorch_model.safetensors" in copied
    # Second load comes from the local cache: deleting the bucket copy must not matter.
    fs.rm("models-bucket/sd/micro", recursive=True)
    again = Scorer.from_pretrained("s3://models-bucket/sd/micro/", device="cpu", storage_options=options)
    assert_scores_close(again.score(captions), micro_scorer.score(captions))


def test_missing_s3_folder_is_a_clear_error(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDITOR_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir("empty-bucket")
    with pytest.raises(ModelLoadError, match="s3://empty-bucket/nothing is not a folder"):
        Scorer.from_pretrained("s3://empty-bucket/nothing", storage_options={"endpoint_url": s3_endpoint})


def test_unreachable_endpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDITOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    options = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(ModelLoadError, match="could not copy model from s3://b-bucket/m.*endpoint"):
        Scorer.from_pretrained("s3://b-bucket/m", storage_options=options)
