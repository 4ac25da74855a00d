"""An audit on local Ray of a model folder as the SD 1.5 repository lays it out: upgrading from the first
fingerprint definition redoes nothing, and --variant fp16 is recorded in _audit.json and the report."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from auditor.config import AuditConfig

pytestmark = pytest.mark.integration

CAPTIONS = [f"a photo of a red cat number {i}" for i in range(12)]


def first_definition(root: Path) -> str:
    """The model fingerprint as auditor computed it before model variants (copied from that version)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt"):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def sd15_like(clean: Path, out: Path) -> Path:
    """`clean` plus fp16 weights, a VAE and safety checker it never loads, and a checkpoint at the root."""
    import diffusers
    import transformers

    shutil.copytree(clean, out)
    for name, cls in (("unet", diffusers.UNet2DConditionModel), ("text_encoder", transformers.CLIPTextModel)):
        scratch = out / f".{name}-fp16"
        cls.from_pretrained(clean / name).to(torch.float16).save_pretrained(scratch, variant="fp16")
        for file in scratch.glob("*.fp16.safetensors"):
            file.rename(out / name / file.name)
        shutil.rmtree(scratch)
    for relative in ("v1-5-pruned.safetensors", "safety_checker/model.safetensors", "README.md"):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(b"never loaded")
    return out


def test_upgrade_redoes_nothing_and_the_variant_is_recorded(
    ray_local, tmp_path, micro_model_dir, monkeypatch
):
    from auditor.pipeline.audit import run
    from auditor.scoring import loading

    model = sd15_like(micro_model_dir, tmp_path / "sd15")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"caption": CAPTIONS}), tmp_path / "in" / "a.parquet")
    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(model), dtype="fp32",
        batch_size=8, quiet=True,
    )  # fmt: skip
    audit_file = tmp_path / "out" / "_audit.json"
    # 1. The output as the previous auditor left it: its model fingerprint is the first definition's.
    with monkeypatch.context() as previous:
        previous.setattr(loading, "fingerprint_model", lambda root, variant=None: first_definition(root))
        assert run(cfg).exit_code == 0
    before = json.loads(audit_file.read_text())
    assert before["model_fingerprint"] == first_definition(model)
    assert before["counts"]["this_run"]["rows"] == len(CAPTIONS)
    # 2. This auditor, twice (the second run reads the ledger its own compaction left): nothing is redone.
    for _ in range(2):
        assert run(cfg).exit_code == 0
        after = json.loads(audit_file.read_text())
        assert after["files"]["audited_this_run"] == 0 and after["files"]["skipped_complete"] == 1
        assert after["model_fingerprint"] != before["model_fingerprint"]
        assert after["model_fingerprint_earlier"] == before["model_fingerprint"]
        assert after["counts"]["output_total"]["rows"] == len(CAPTIONS)
    # 3. The fp16 weights are another model: audited again, and the variant is in _audit.json and the report.
    assert run(dataclasses.replace(cfg, variant="fp16")).exit_code == 0
    audit = json.loads(audit_file.read_text())
    assert audit["files"]["audited_this_run"] == 1 and audit["counts"]["this_run"]["rows"] == len(CAPTIONS)
    assert audit["model_variant"] == "fp16" and audit["config"]["variant"] == "fp16"
    report = (tmp_path / "out" / "report.html").read_text()
    assert "model weights variant" in report and "fp16" in report
