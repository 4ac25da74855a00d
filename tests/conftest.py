"""Shared fixtures: tiny SD folders built from configs once per session; no downloads, ever."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Random tiny SD v1-style model (epsilon prediction), 4x16x16 latents."""
    from auditor.toy.models import TINY, build_random_sd

    return build_random_sd(tmp_path_factory.mktemp("tiny-eps") / "model", TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory) -> Path:
    """Random tiny SD 2.x-style model (v-prediction), with a non-square latent to catch shape assumptions."""
    from auditor.toy.models import TINY, build_random_sd

    return build_random_sd(
        tmp_path_factory.mktemp("tiny-v") / "model", TINY, seed=1, prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def tiny_scorer(tiny_model_dir):
    from auditor import Scorer

    return Scorer.from_pretrained(tiny_model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (free port) for the session; credentials through the environment only."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """The toy memorizing model, `test` preset, seed 0: trained once per session (about 1-2 min on 2 CPU cores).

    A diffusers SD folder plus `toy_manifest.json`: `auditor.toy.manifest.load_manifest(toy_model_dir)` gives the
    memorized captions (each with its trigger word and training latent), seen-once and held-out captions.
    """
    from auditor.toy.train import build_toy_model

    path, _ = build_toy_model(tmp_path_factory.mktemp("toy") / "model", "test", seed=0)
    return path


@pytest.fixture(scope="session")
def family_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Random tiny pipelines of the newer families, built from configs with offline tokenizers (a few seconds):
    sdxl, sd3 (with T5), sd3-no-t5 (text_encoder_3 recorded as null), pixart-sigma.
    """
    from auditor.toy.families import build_random_pixart, build_random_sd3, build_random_sdxl

    root = tmp_path_factory.mktemp("families")
    return {
        "sdxl": build_random_sdxl(root / "sdxl", seed=0),
        "sd3": build_random_sd3(root / "sd3", seed=0),
        "sd3-no-t5": build_random_sd3(root / "sd3-no-t5", seed=1, t5=False),
        "pixart-sigma": build_random_pixart(root / "pixart", seed=0),
    }
