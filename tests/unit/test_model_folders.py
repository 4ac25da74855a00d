"""Model folders as hubs lay them out (fp16-only, SD 1.5's extras, sharded weights, --variant) and the model
fingerprint: what it covers, its digest cache, and the first definition's values that old audits recorded."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from auditor import Scorer
from auditor.config import AuditConfig, ScoreConfig
from auditor.errors import ConfigError, ModelLoadError
from auditor.io.ledger import DONE, Ledger
from auditor.pipeline import plan as plan_mod
from auditor.pipeline.plan import plan_audit, resolve_threshold, run_fingerprint
from auditor.scoring import fingerprint as fp_mod
from auditor.scoring import loading
from auditor.scoring.layout import model_files, select_model_files
from tests.scores_close import assert_scores_close

CAPTIONS = ["a red cat sitting in a park", "an old castle at night", "mona lisa by leonardo"]
WEIGHTS = {"unet": "diffusion_pytorch_model", "text_encoder": "model"}
# What the SD 1.5 repository holds beside what scoring loads (small fakes; none is a loadable file).
SD15_EXTRAS = (
    "v1-5-pruned.safetensors",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-inference.yaml",
    "README.md",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin",
    "feature_extractor/preprocessor_config.json",
)


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    """Each test its own digest cache; files written by the test itself count as settled (cacheable)."""
    monkeypatch.setenv("AUDITOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fp_mod, "RACY_S", -1.0)
    return tmp_path / "cache" / "digests"


def load_weights(folder: Path, name: str, dtype: torch.dtype = torch.float32, variant: str | None = None):
    import diffusers
    import transformers

    cls = diffusers.UNet2DConditionModel if name == "unet" else transformers.CLIPTextModel
    kwargs = {"torch_dtype": dtype} if name == "unet" else {loading.text_dtype_kwarg(): dtype}
    return cls.from_pretrained(folder / name, variant=variant, **kwargs)


def save_variant(clean: Path, folder: Path, name: str, variant: str, dtype: torch.dtype) -> None:
    """Component `name` of `clean` saved into `folder/name` as `variant` in `dtype` (beside what is there)."""
    model = load_weights(clean, name).to(dtype)
    scratch = folder / f".{name}-{variant}"
    model.save_pretrained(scratch, variant=variant)
    for file in scratch.glob(f"*.{variant}.safetensors"):
        file.rename(folder / name / file.name)
    shutil.rmtree(scratch)


def fp16_only(clean: Path, out: Path) -> Path:
    shutil.copytree(clean, out)
    for name, stem in WEIGHTS.items():
        (out / name / f"{stem}.safetensors").unlink()
        save_variant(clean, out, name, "fp16", torch.float16)
    return out


def with_sd15_extras(clean: Path, out: Path) -> Path:
    """`clean` plus fp16 variants and every kind of file the SD 1.5 repository holds that scoring never loads."""
    shutil.copytree(clean, out)
    for name in WEIGHTS:
        save_variant(clean, out, name, "fp16", torch.float16)
    for relative in SD15_EXTRAS:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(
            b"not a model file: loading or hashing it is the bug " + relative.encode()
        )
    return out


def sharded(clean: Path, out: Path) -> Path:
    shutil.copytree(clean, out)
    for name in WEIGHTS:
        shutil.rmtree(out / name)
        load_weights(clean, name).save_pretrained(out / name, max_shard_size="100KB")
    return out


def scores(model: Path, **kwargs) -> tuple[Scorer, np.ndarray]:
    scorer = Scorer.from_pretrained(model, device="cpu", dtype="fp32", **kwargs)
    return scorer, scorer.score(CAPTIONS, generations=2)


def assert_same_weights(a: Scorer, b: Scorer) -> None:
    for name in ("unet", "text_encoder"):
        left, right = getattr(a.components, name).state_dict(), getattr(b.components, name).state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), name


def legacy_reference(root: Path) -> str:
    """The model fingerprint as auditor computed it before this change (copied from that version)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt"):
            digest.update(str(path.relative_to(root)).encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def hashed(monkeypatch):
    """The paths whose bytes the fingerprint reads, in order."""
    seen: list[Path] = []
    real = fp_mod._hash_file

    def spy(path, digest=None):
        seen.append(Path(path))
        return real(path, digest)

    monkeypatch.setattr(fp_mod, "_hash_file", spy)
    return seen


# 1. fp16-only folders -------------------------------------------------------------------------------------------
def test_an_fp16_only_folder_loads_as_fp16_and_scores_as_the_clean_one_within_fp16_rounding(
    tiny_model_dir, tmp_path
):
    model = fp16_only(tiny_model_dir, tmp_path / "fp16")
    assert model_files(model).variant == "fp16"
    scorer, got = scores(model)
    assert scorer.components.variant == "fp16"
    rounded = {name: load_weights(tiny_model_dir, name).half().float().state_dict() for name in WEIGHTS}
    for name in WEIGHTS:  # the fp16 file holds exactly the clean weights rounded to fp16
        loaded = getattr(scorer.components, name).state_dict()
        assert all(torch.equal(loaded[k], rounded[name][k]) for k in loaded), name
    clean, expected = scores(tiny_model_dir)
    np.testing.assert_allclose(got, expected, rtol=2e-2)
    assert not np.array_equal(got, expected)  # the weights really are the rounded ones
    assert scorer.fingerprint != clean.fingerprint
    assert Scorer.from_pretrained(model, device="cpu", variant="fp16").fingerprint == scorer.fingerprint


def test_a_folder_with_nothing_loadable_is_one_line_naming_folder_found_and_fix(tiny_model_dir, tmp_path):
    model = fp16_only(tiny_model_dir, tmp_path / "m")
    (model / "text_encoder" / "model.fp16.safetensors").rename(model / "text_encoder" / "weights.safetensors")
    with pytest.raises(ModelLoadError, match=r"text_encoder has no \*.safetensors weights") as caught:
        Scorer.from_pretrained(model, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and str(model) in message
    assert "found: config.json, weights.safetensors" in message and "save_pretrained" in message


# 2. Folders with several variants and the SD 1.5 repository's extras ----------------------------------------------
def test_extras_are_neither_loaded_nor_hashed_and_the_default_scores_as_the_clean_folder(
    tiny_model_dir, tmp_path, hashed
):
    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    selected = model_files(model)
    assert selected.variant is None
    assert not set(selected.files) & set(SD15_EXTRAS)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in selected.files
    fingerprint = loading.fingerprint_model(model)
    assert {p.relative_to(model).as_posix() for p in hashed} == set(selected.files)
    assert fingerprint == loading.fingerprint_model(tiny_model_dir)  # same files scoring reads, same value
    scorer, got = scores(model)
    clean, expected = scores(tiny_model_dir)
    assert_same_weights(scorer, clean)
    assert_scores_close(got, expected)


@pytest.mark.parametrize(
    "change",
    [
        "vae/diffusion_pytorch_model.safetensors",  # SD 1.5 with the fine-tuned MSE VAE
        "safety_checker/model.safetensors",
        "v1-5-pruned.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "README.md",
        "notes.txt",
        "unet/README.json",
        "feature_extractor/preprocessor_config.json",
    ],
)
def test_files_that_do_not_change_scores_do_not_change_the_fingerprint(tiny_model_dir, tmp_path, change):
    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    before = loading.fingerprint_model(model)
    (model / change).write_bytes(b"changed or added: " + os.urandom(16))
    assert loading.fingerprint_model(model) == before


@pytest.mark.parametrize(
    "change",
    [
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/config.json",
        "tokenizer/",  # the file its tokenizer loads: tokenizer.json, or vocab.json where it was saved without one
        "scheduler/scheduler_config.json",
        "vae/config.json",  # block_out_channels sets the latent-to-pixel factor some families read
        "model_index.json",
    ],
)
def test_files_that_scores_read_change_the_fingerprint(tiny_model_dir, tmp_path, change):
    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    before = loading.fingerprint_model(model)
    if change == "tokenizer/":
        selected = model_files(model).files
        change = next(f for f in ("tokenizer/tokenizer.json", "tokenizer/vocab.json") if f in selected)
    path = model / change
    path.write_bytes(path.read_bytes() + b" ")
    assert loading.fingerprint_model(model) != before


def test_variant_selects_its_weights_and_falls_back_per_component(tiny_model_dir, tmp_path):
    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    selected = model_files(model, "fp16")
    assert selected.variant == "fp16" and selected.weights == {"unet": "fp16", "text_encoder": "fp16"}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in selected.files
    assert "unet/diffusion_pytorch_model.safetensors" not in selected.files
    scorer, got = scores(model, variant="fp16")
    only, expected = scores(fp16_only(tiny_model_dir, tmp_path / "fp16"))
    assert_same_weights(scorer, only)
    assert_scores_close(got, expected)
    assert scorer.fingerprint != loading.fingerprint_model(model)  # another variant, other weights
    # A component without the variant loads its default weights (diffusers' DiffusionPipeline does the same).
    (model / "text_encoder" / "model.fp16.safetensors").unlink()
    assert model_files(model, "fp16").weights == {"unet": "fp16", "text_encoder": None}


@pytest.mark.parametrize(
    ("layout", "variant", "match"),
    [
        ({"unet": ["fp16", "bf16"], "text_encoder": ["fp16", "bf16"]}, None,
         r"no default weights in unet, text_encoder and no single variant .*Pass --variant bf16 or fp16"),
        ({"unet": ["fp16"], "text_encoder": ["bf16"]}, None,
         r"variants: unet: fp16; text_encoder: bf16\). Save every component in one variant"),
        ({"unet": ["fp16"], "text_encoder": ["bf16"]}, "fp16",
         r"text_encoder has no fp16 weights and no default ones; its variants: bf16. Pass --variant"),
        ({"unet": [None, "fp16"], "text_encoder": [None]}, "bf16",
         r"--variant bf16: no component of .* has bf16 weights; variants there: unet: \(default\), fp16; "
         r"text_encoder: \(default\)"),
        ({"unet": [None], "text_encoder": [None]}, "../fp16", r"--variant '../fp16' is not a weights variant"),
    ],
)  # fmt: skip
def test_variant_errors_name_what_is_there_and_the_fix(layout, variant, match):
    listing = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"]
    for name, variants in layout.items():
        listing.append(f"{name}/config.json")
        listing += [f"{name}/{WEIGHTS[name]}{'.' + v if v else ''}.safetensors" for v in variants]
    index = {"_class_name": "StableDiffusionPipeline"}
    with pytest.raises(ModelLoadError, match=match):
        select_model_files(listing, index, variant, "/models/m")


def test_variant_is_a_config_field():
    assert AuditConfig.from_argv(["in", "out", "--model", "m", "--variant", "fp16"]).variant == "fp16"
    assert AuditConfig.from_argv(["in", "out", "--model", "m"]).variant is None
    with pytest.raises(ConfigError, match=r"variant must be a weights variant name such as fp16.*'fp/16'"):
        ScoreConfig(model="m", variant="fp/16")


def test_variant_appears_in_every_model_commands_help(capsys):
    from auditor.cli import main

    for command in ("audit", "score", "calibrate", "evaluate", "explain", "mitigate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--variant" in capsys.readouterr().out, command


def test_score_cli_loads_the_variant_asked_for(tiny_model_dir, tmp_path, capsys):
    from auditor.cli import main

    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    base = ["score", "--model", str(model), "--dtype", "fp32", "--device", "cpu", "--json", CAPTIONS[0]]
    assert main(base) == 0
    default = capsys.readouterr().out
    assert main([*base, "--variant", "fp16"]) == 0
    assert capsys.readouterr().out != default
    assert main([*base, "--variant", "bf16"]) != 0
    assert "error: --variant bf16: no component of" in capsys.readouterr().err


# 3. Sharded weights -------------------------------------------------------------------------------------------------
def test_sharded_weights_with_an_index_load_exactly(tiny_model_dir, tmp_path):
    model = sharded(tiny_model_dir, tmp_path / "sharded")
    selected = model_files(model)
    shards = [f for f in selected.files if f.startswith("unet/") and "-of-" in f]
    assert len(shards) > 1 and "unet/diffusion_pytorch_model.safetensors.index.json" in selected.files
    assert "text_encoder/model.safetensors.index.json" in selected.files
    scorer, got = scores(model)
    clean, expected = scores(tiny_model_dir)
    assert_same_weights(scorer, clean)  # bit for bit
    # Equal weights give equal scores up to float32 rounding: CPU kernels' summation order depends on how the
    # memory-mapped tensors are aligned, which differs between one file and shards (the clean folder itself
    # scores in the last bits differently once its weights are copied elsewhere in memory).
    assert_scores_close(got, expected)
    before = scorer.fingerprint
    last = model / shards[-1]
    last.write_bytes(last.read_bytes()[:-4] + b"\0\0\0\1")
    assert loading.fingerprint_model(model) != before


# 4. The digest cache ------------------------------------------------------------------------------------------------
def test_a_second_fingerprint_reads_no_weights_and_a_changed_file_is_read_again(
    tiny_model_dir, tmp_path, hashed, digest_cache
):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    first = loading.fingerprint_model(model)
    assert len(hashed) == len(model_files(model).files)
    assert any(digest_cache.rglob("*"))  # under $AUDITOR_CACHE/digests
    hashed.clear()
    assert loading.fingerprint_model(model) == first and hashed == []
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))  # same size
    changed = loading.fingerprint_model(model)
    assert changed != first and hashed == [config]


def test_files_changed_within_the_clock_tick_are_never_served_from_the_cache(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(fp_mod, "RACY_S", 3600.0)  # every file is "just written"
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    loading.fingerprint_model(model)
    assert not (tmp_path / "cache" / "digests").exists()


def test_a_torn_or_unwritable_cache_costs_only_a_rehash(tiny_model_dir, tmp_path, hashed, digest_cache):
    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    expected = loading.fingerprint_model(model)
    for entry in (p for p in digest_cache.rglob("*") if p.is_file()):
        entry.write_text("half")
    hashed.clear()
    assert loading.fingerprint_model(model) == expected and len(hashed) == len(model_files(model).files)
    shutil.rmtree(digest_cache)
    digest_cache.parent.mkdir(parents=True, exist_ok=True)
    digest_cache.write_text("a file where the cache folder should be")
    assert loading.fingerprint_model(model) == expected


# 5. Audits recorded under the first definition -------------------------------------------------------------------
def test_legacy_fingerprint_is_the_first_definition(tiny_model_dir, tmp_path, hashed):
    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    assert fp_mod.legacy_fingerprint(model) == legacy_reference(model)
    hashed.clear()
    assert fp_mod.legacy_fingerprint(model) == legacy_reference(model) and hashed == []  # cached


def mark_done(cfg: AuditConfig, file, fingerprint: str) -> None:
    Ledger(fsspec.filesystem("file"), cfg.output).mark(
        {"source": file.source, "shard": file.shard, "unit": 0, "file_units": 1, "status": DONE,
         "identity": file.identity, "fingerprint": fingerprint, "unit_rows": cfg.unit_rows}
    )  # fmt: skip


def test_outputs_audited_under_the_first_definition_are_not_audited_again(
    tiny_model_dir, tmp_path, monkeypatch
):
    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"caption": CAPTIONS}), tmp_path / "in" / f"{name}.parquet")
    threshold_file = tmp_path / "t.json"
    # A threshold file and a ledger as the previous auditor left them: both carry the first definition's value.
    old_model = legacy_reference(model)
    threshold_file.write_text(json.dumps({"threshold": 1.0, "model_fingerprint": old_model}))
    cfg = AuditConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(model),
        threshold_file=str(threshold_file),
    )  # fmt: skip
    old_run = run_fingerprint(cfg, old_model, resolve_threshold(cfg))
    first = plan_audit(cfg)
    assert first.model_fingerprint != old_model and len(first.pending) == 2
    for item in first.pending:
        mark_done(cfg, item.file, old_run)
    warnings = []
    monkeypatch.setattr(plan_mod.logger, "warning", lambda *args: warnings.append(args))
    again = plan_audit(cfg)
    assert again.pending == [] and len(again.skipped) == 2
    assert again.earlier_fingerprints == {old_run} and again.earlier_model_fingerprint == old_model
    assert warnings == []  # the threshold file counts as calibrated on this model
    # The first definition knew no variants (auditor loaded the default weights): fp16 weights are another model.
    fp16 = plan_audit(dataclasses.replace(cfg, variant="fp16"))
    assert len(fp16.pending) == 2 and fp16.earlier_fingerprints == frozenset()
    assert any("calibrated on another model" in str(args) for args in warnings)
    warnings.clear()
    # The first definition covered README-like files too; the new one does not: an unchanged model stays done.
    # A changed weight file is another model under both definitions: everything is audited again.
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    changed = plan_audit(cfg)
    assert len(changed.pending) == 2 and changed.skipped == []
    assert any("calibrated on another model" in str(args) for args in warnings)


def test_the_first_definition_is_not_computed_when_every_record_matches(
    tiny_model_dir, tmp_path, monkeypatch
):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"caption": CAPTIONS}), tmp_path / "in" / "a.parquet")
    cfg = AuditConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(tiny_model_dir))
    plan = plan_audit(cfg)
    mark_done(cfg, plan.pending[0].file, plan.fingerprint)

    def refuse(root):
        raise AssertionError("the first definition reads every file; nothing here needs it")

    monkeypatch.setattr(loading, "legacy_fingerprint", refuse)
    started = time.perf_counter()
    again = plan_audit(cfg)
    assert again.pending == [] and again.earlier_fingerprints == frozenset()
    assert again.model_variant is None
    assert time.perf_counter() - started < 30


def test_the_plan_records_the_variant(tiny_model_dir, tmp_path):
    model = fp16_only(tiny_model_dir, tmp_path / "fp16")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"caption": CAPTIONS}), tmp_path / "in" / "a.parquet")
    cfg = AuditConfig(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model=str(model))
    assert plan_audit(cfg).model_variant == "fp16"


# 6. Fetching from a hub: only what scoring loads -------------------------------------------------------------------
def test_hub_download_fetches_only_what_scoring_loads(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    listing = [p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()]
    asked: list[list[str]] = []

    class FakeApi:
        def list_repo_files(self, repo_id):
            assert repo_id == "someone/sd15"
            return listing

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name: str(model / name))
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id, allow_patterns: asked.append(allow_patterns) or model,
    )
    assert loading.resolve_model_dir("someone/sd15") == model
    assert asked[-1] == list(model_files(model).files)
    assert not set(asked[-1]) & set(SD15_EXTRAS)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in asked[-1]
    loading.resolve_model_dir("someone/sd15", variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in asked[-1]
    assert "unet/diffusion_pytorch_model.safetensors" not in asked[-1]
    with pytest.raises(
        ModelLoadError, match="--variant bf16: no component of hub model someone/sd15 has bf16"
    ):
        loading.resolve_model_dir("someone/sd15", variant="bf16")


def test_mitigate_images_decode_with_the_vae_of_the_variant_or_say_why_not(tiny_model_dir, tmp_path):
    from auditor.scoring.layout import vae_variant

    model = with_sd15_extras(tiny_model_dir, tmp_path / "sd15")
    assert vae_variant(model, None) is None and vae_variant(model, "fp16") == "fp16"
    assert vae_variant(model, "bf16") is None  # the VAE's default weights, as for any other component
    only = fp16_only(tiny_model_dir, tmp_path / "fp16")
    (only / "vae" / "diffusion_pytorch_model.safetensors").rename(
        only / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    )
    assert vae_variant(only, None) == "fp16"
    (only / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"vae has no VAE weights of variant fp16 .*fetched without them. Pass a local copy",
    ):
        vae_variant(only, "fp16")


def test_mitigate_generate_without_vae_weights_fails_before_any_work(tiny_model_dir, tmp_path, capsys):
    from auditor.cli import main

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()  # as a hub or s3:// copy holds it
    out = tmp_path / "e.safetensors"
    argv = ["mitigate", "--model", str(model), CAPTIONS[0], "--target", "1", "--out", str(out)]
    assert main([*argv, "--generate", str(tmp_path / "x.png")]) == 2
    assert (
        "vae has no VAE weights to decode images with (variants: none)" in capsys.readouterr().err
        and not out.exists()
    )


def test_offline_a_hub_snapshot_already_cached_still_serves(tiny_model_dir, monkeypatch):
    import huggingface_hub

    class OfflineApi:
        def list_repo_files(self, repo_id):
            raise OSError("offline")

    def snapshot(repo_id, local_files_only=False, allow_patterns=None):
        assert local_files_only and allow_patterns is None
        return tiny_model_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert loading.resolve_model_dir("someone/cached") == tiny_model_dir
