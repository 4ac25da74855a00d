"""AuditConfig / FilterConfig: one parser, defaults on the dataclass, validation on construction."""

from __future__ import annotations

import dataclasses

import pytest

from auditor.config import AuditConfig, FilterConfig, audit_parser
from auditor.errors import ConfigError

BASE = ["in/", "out/", "--model", "m"]


def test_defaults_live_on_the_dataclass():
    cfg = AuditConfig.from_argv(BASE)
    assert cfg == AuditConfig(inputs=("in/",), output="out/", model="m")
    assert (cfg.caption_column, cfg.actors, cfg.batch_size, cfg.threshold) == ("caption", 1, 32, None)


def test_flags_are_field_names_in_kebab_case():
    cfg = AuditConfig.from_argv(
        ["a.parquet", "b.jsonl", "out", "--model", "m", "--caption-column", "text", "--id-column", "key",
         "--keep-columns", "url,width", "--generations", "2", "--steps", "3", "--seed", "7", "--threshold", "1.5",
         "--score-sigma", "0.94",
         "--batch-size", "8", "--actors", "2", "--cpus-per-actor", "0.5", "--gpus-per-actor", "0", "--dtype", "fp32",
         "--storage-option", "endpoint_url=http://h:9", "--storage-option", "anon=false", "--force",
         "--explain-flagged", "--quiet", "--num-cpus", "4", "--format", "jsonl"]
    )  # fmt: skip
    assert cfg.inputs == ("a.parquet", "b.jsonl") and cfg.output == "out"
    assert cfg.keep_columns == ("url", "width")
    assert cfg.storage_options == {"endpoint_url": "http://h:9", "anon": False}
    assert (cfg.generations, cfg.steps, cfg.seed, cfg.threshold, cfg.batch_size) == (2, 3, 7, 1.5, 8)
    assert cfg.score_sigma == 0.94
    assert cfg.force and cfg.explain_flagged and cfg.quiet and cfg.format == "jsonl"
    option_strings = {o for a in audit_parser()._actions for o in a.option_strings}
    for f in dataclasses.fields(AuditConfig):
        if f.name not in ("inputs", "output", "storage_options"):
            assert "--" + f.name.replace("_", "-") in option_strings


def test_to_json_round_trips():
    cfg = AuditConfig.from_argv([*BASE, "--keep-columns", "a", "--storage-option", "endpoint_url=x"])
    data = cfg.to_json()
    assert (
        AuditConfig(**{**data, "inputs": tuple(data["inputs"]), "keep_columns": tuple(data["keep_columns"])})
        == cfg
    )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"threshold": 1.0, "threshold_file": "t.json"}, "not both"),
        ({"threshold": float("nan")}, "finite"),
        ({"steps": 0}, r"--steps must be an int in 1\.\.50, got 0"),
        ({"score_sigma": 0.0}, r"--score-sigma must be a number in \(0, 1\], got 0\.0"),
        ({"score_sigma": 1.5}, r"--score-sigma must be a number in \(0, 1\], got 1\.5"),
        ({"generations": 0}, "--generations must be an int >= 1"),
        ({"batch_size": 0}, "--batch-size"),
        ({"actors": 0}, "--actors"),
        ({"seed": -1}, "--seed"),
        ({"cpus_per_actor": 0}, "--cpus-per-actor"),
        ({"gpus_per_actor": -1}, "--gpus-per-actor"),
        ({"dtype": "fp8"}, "--dtype 'fp8'"),
        ({"format": "xml"}, "--format 'xml' is not one of"),
        ({"format": "parquet.gz"}, r"--format 'parquet.gz' is not one of .* followed by \.gz"),
        ({"compression": "lz4"}, "--compression 'lz4' is not one of gzip, bz2, zstd, xz, none"),
        ({"format": "parquet", "compression": "gzip"}, "--compression gzip does not apply to parquet"),
        ({"keep_columns": ("score",)}, "clash with output columns"),
        ({"keep_columns": ("a", "a")}, "twice"),
        (
            {"keep_columns": ("url", "_node")},
            "--keep-columns _node are names of the audit's internal columns",
        ),
        ({"num_cpus": 1}, "--num-cpus must be >= 2"),
        ({"inputs": ()}, "INPUT must name"),
        ({"caption_column": ""}, "--caption-column is empty"),
        ({"storage_options": {"key": "AKIA"}}, "credential"),
        ({"storage_options": {"aws_secret_access_key": "x"}}, "from the environment"),
        ({"lease_heartbeat_s": 0}, r"--lease-heartbeat-s must be a number of seconds > 0, got 0"),
        ({"lease_ttl_s": float("inf")}, r"--lease-ttl-s must be a number of seconds > 0, got inf"),
        ({"lease_ttl_s": True}, r"--lease-ttl-s must be a number of seconds > 0, got True"),
        (
            {"lease_ttl_s": 20, "lease_heartbeat_s": 15},
            r"--lease-ttl-s 20 must be at least twice --lease-heartbeat-s 15",
        ),
    ],
)
def test_invalid_configs_cannot_exist(changes, match):
    with pytest.raises(ConfigError, match=match):
        AuditConfig(**{"inputs": ("in",), "output": "out", "model": "m", **changes})


def test_format_with_a_codec_splits_and_compression_overrides():
    cfg = AuditConfig.from_argv([*BASE, "--format", "jsonl.gz"])
    assert (cfg.format, cfg.compression) == ("jsonl", "gzip")
    cfg = AuditConfig.from_argv([*BASE, "--format", "csv.zst", "--compression", "bz2"])
    assert (cfg.format, cfg.compression) == ("csv", "bz2")
    cfg = AuditConfig.from_argv([*BASE, "--compression", "none"])
    assert (cfg.format, cfg.compression) == (None, "none")
    assert dataclasses.replace(cfg, actors=2).compression == "none"
    with pytest.raises(SystemExit):
        AuditConfig.from_argv([*BASE, "--compression", "zip"])
    cfg = FilterConfig.from_argv(["d/", "audit/", "out/", "--format", "txt.xz"])
    assert (cfg.format, cfg.compression) == ("txt", "xz")


def test_replace_revalidates():
    cfg = AuditConfig(inputs=("in",), output="out", model="m")
    with pytest.raises(ConfigError, match="--actors"):
        dataclasses.replace(cfg, actors=0)


def test_storage_option_needs_key_value():
    with pytest.raises(SystemExit):
        AuditConfig.from_argv([*BASE, "--storage-option", "novalue"])


def test_filter_config():
    cfg = FilterConfig.from_argv(["data/", "runs/a", "runs/clean", "--mode", "mark"])
    assert (cfg.inputs, cfg.audit_output, cfg.output, cfg.mode) == (
        ("data/",),
        "runs/a",
        "runs/clean",
        "mark",
    )
    with pytest.raises(ConfigError, match="--mode 'keep' is not one of drop, mark"):
        FilterConfig(inputs=("d",), audit_output="a", output="o", mode="keep")
    with pytest.raises(ConfigError, match="AUDIT_OUTPUT must be"):
        FilterConfig(inputs=("d",), audit_output="", output="o")


def test_cuda_graphs_flag_and_resolved_actor_runtime():
    from auditor.pipeline.audit import actor_runtime

    assert AuditConfig.from_argv(BASE).cuda_graphs is None
    assert AuditConfig.from_argv([*BASE, "--no-cuda-graphs"]).cuda_graphs is False
    on = AuditConfig.from_argv([*BASE, "--cuda-graphs"])
    assert on.cuda_graphs is True
    gpu = actor_runtime(AuditConfig.from_argv(BASE), {"num_cpus": 1, "num_gpus": 1})
    assert (gpu["actor_device"], gpu["dtype"], gpu["cuda_graphs"]) == ("cuda", "fp16", True)
    cpu = actor_runtime(AuditConfig.from_argv(BASE), {"num_cpus": 1, "num_gpus": 0})
    assert (cpu["actor_device"], cpu["dtype"], cpu["cuda_graphs"]) == ("cpu", "fp32", False)
    with pytest.raises(ConfigError, match="--cuda-graphs needs GPU actors"):
        actor_runtime(on, {"num_cpus": 1, "num_gpus": 0})
