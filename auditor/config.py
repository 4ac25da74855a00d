"""`AuditConfig` and `FilterConfig`: frozen, validated on construction, built from argv by one parser.

The CLI and the Ray Job entrypoints (jobs/) build configs through the same `*_parser()` functions, so a flag is
the field name in kebab-case and its default lives on the dataclass only. Imports nothing heavier than argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

from auditor import schema
from auditor.errors import ConfigError
from auditor.formats import (
    CODEC_EXTENSIONS,
    COMPRESSIONS,
    FORMAT_NAMES,
    FORMATS,
    NO_COMPRESSION,
    STREAM_FORMATS,
    split_name,
)
from auditor.redact import redact_value

DTYPES = ("auto", "fp16", "bf16", "fp32")
MAX_STEPS = 50  # the DDIM-50 schedule the score follows
SCORE_SIGMA_HELP = (
    "flow-matching models (SD3 / SD3.5) only: score at this noise level in (0, 1] instead of sigma = 1, after "
    "one CFG Euler step from x_T (default: sigma = 1, x_T itself; README 'Why sigma = 1 for SD3')"
)
VARIANT_HELP = (
    "weights variant to load, as in diffusion_pytorch_model.<variant>.safetensors (e.g. fp16). Default: the "
    "default weights, or the only variant a folder has (an fp16-only folder loads as fp16)"
)
# Rows per work unit (whole parquet row groups): the resume, commit and output-file granularity. At 100k rows a unit
# is ~4 min of one GPU at 450 captions/s (a crash loses at most that per actor), one ~10 MB part file, and one
# ledger record per 100k rows (23k records for a 2.3B-row corpus: a ledger that reads in seconds).
DEFAULT_UNIT_ROWS = 100_000
FILTER_MODES = ("drop", "mark")
# storage options that would carry a secret: credentials come from the environment or the default chain only.
SECRET_OPTION_KEYS = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
)
OUTPUT_COLUMNS = frozenset(schema.SCORES_SCHEMA.names) | {schema.SHARD, *schema.FLAGGED_SCHEMA_EXTRA}


def _check_storage_options(options: dict[str, Any]) -> None:
    secret = sorted(SECRET_OPTION_KEYS.intersection(k.lower() for k in options))
    if secret:
        raise ConfigError(
            f"--storage-option {', '.join(secret)} would put a credential on the command line; credentials come "
            "only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or the instance role). "
            "Remove the option and export the variables instead."
        )


def _check_common(inputs: tuple[str, ...], output: str, fmt: str | None, options: dict[str, Any]) -> None:
    if not inputs or any(not str(i).strip() for i in inputs):
        raise ConfigError(f"INPUT must name at least one file, folder, glob or URI, got {list(inputs)!r}.")
    if not str(output).strip():
        raise ConfigError("OUTPUT must be a folder path or URI, got an empty string.")
    if fmt is not None and fmt not in FORMAT_NAMES:
        raise ConfigError(
            f"--format {fmt!r} is not one of {', '.join(FORMATS)}, nor one of {', '.join(STREAM_FORMATS)} followed by "
            f"{', '.join(CODEC_EXTENSIONS)} (e.g. jsonl.gz); leave it out to pick by extension."
        )
    if not isinstance(options, dict):
        raise ConfigError(f"storage_options must be a dict, got {type(options).__name__}.")
    _check_storage_options(options)


def _split_format(config: Any) -> None:
    """Check --compression, then split a --format with a codec (`jsonl.gz`) into the format and, unless
    --compression is given (it overrides), the compression, so that config.format is a FORMATS name.
    """
    if config.compression is not None and config.compression not in COMPRESSIONS:
        raise ConfigError(
            f"--compression {config.compression!r} is not one of {', '.join(COMPRESSIONS)}; leave it out to pick "
            f"by extension ({', '.join(CODEC_EXTENSIONS)})."
        )
    if config.format is None or config.format in FORMATS:
        fmt = config.format
    else:
        fmt, codec = split_name(f".{config.format}")
        if config.compression is None:
            object.__setattr__(config, "compression", codec)
        object.__setattr__(config, "format", fmt)
    if fmt == "parquet" and config.compression not in (None, NO_COMPRESSION):
        raise ConfigError(
            f"--compression {config.compression} does not apply to parquet (it compresses inside the file); "
            f"--compression is for {', '.join(STREAM_FORMATS)} inputs."
        )


def check_confirm_options(
    confirm_generations: int | None,
    confirm_steps: int | None,
    screen_threshold: float | None,
    option: Callable[[str], str],
) -> None:
    """The second stage's options: ints in range, a finite screening threshold. Whether the second stage is on and
    has a screening threshold depends on the threshold file too: resolve_threshold checks that, reading the file."""
    for name, value, most in (
        ("confirm-generations", confirm_generations, None),
        ("confirm-steps", confirm_steps, MAX_STEPS),
    ):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (most and value > most):
            span = f"in 1..{most}" if most else ">= 1"
            raise ConfigError(f"{option(name)} must be an int {span}, got {value!r}.")
    if screen_threshold is not None and (
        isinstance(screen_threshold, bool)
        or not isinstance(screen_threshold, int | float)
        or not math.isfinite(screen_threshold)
    ):
        raise ConfigError(f"{option('screen-threshold')} must be a finite number, got {screen_threshold!r}.")


class ParsedConfig:
    """What every frozen config shares: one parser builds it, and it serialises to JSON next to its results."""

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The resolved config as JSON-ready values, written next to the results: storage options hold endpoints,
        never secret keys, and every URI in it (INPUT, OUTPUT, the model, an endpoint_url with userinfo) is
        redacted (auditor.redact)."""
        return redact_value(json.loads(json.dumps(dataclasses.asdict(self))))

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> Self:
        return cls.from_namespace(cls.parser().parse_args(list(argv)))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> Self:
        return cls(**_fields_from(cls, args))


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """What a score actor depends on: the model, the score's options and the threshold; no inputs, no outputs.

    `AuditConfig` is one (plus inputs, outputs and the run's options); `auditor.ray_data` builds one from its
    keyword arguments. threshold None and threshold_file None: nothing is flagged. cpus_per_actor also sets the
    actor's torch threads on CPU. Error messages name the options as `option()` spells them: keyword arguments
    here, flags (`--batch-size`) in `AuditConfig`.
    """

    model: str
    caption_column: str = "caption"
    generations: int = 1
    steps: int = 1
    score_sigma: float | None = None
    seed: int = 0
    threshold: float | None = None
    threshold_file: str | None = None
    batch_size: int = 32
    cpus_per_actor: float = 1.0
    dtype: str = "auto"
    cuda_graphs: bool | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    explain_flagged: bool = False
    # The second stage (auditor.scoring.cascade): None and None leave it off, unless the threshold file has one.
    confirm_generations: int | None = None
    confirm_steps: int | None = None
    screen_threshold: float | None = None
    variant: str | None = None

    @staticmethod
    def option(name: str) -> str:
        """How an error message names the option `name` (kebab-case): the keyword argument."""
        return name.replace("-", "_")

    def __post_init__(self) -> None:
        o = self.option
        if not isinstance(self.storage_options, dict):
            raise ConfigError(f"storage_options must be a dict, got {type(self.storage_options).__name__}.")
        _check_storage_options(self.storage_options)
        if not str(self.model).strip():
            raise ConfigError(f"{o('model')} is empty; pass a diffusers folder, hub id or s3:// URI.")
        if not self.caption_column:
            raise ConfigError(
                f"{o('caption-column')} is empty; pass the name of the column that holds the captions."
            )
        for name, value, low in (("generations", self.generations, 1), ("batch-size", self.batch_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{o(name)} must be an int >= {low}, got {value!r}.")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"{o('steps')} must be an int in 1..{MAX_STEPS}, got {self.steps!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"{o('seed')} must be an int >= 0, got {self.seed!r}.")
        if self.score_sigma is not None and (
            isinstance(self.score_sigma, bool)
            or not isinstance(self.score_sigma, int | float)
            or not 0.0 < self.score_sigma <= 1.0
        ):
            raise ConfigError(
                f"{o('score-sigma')} must be a number in (0, 1], got {self.score_sigma!r}; e.g. 0.94 "
                "(flow-matching models only)."
            )
        if self.threshold is not None and self.threshold_file is not None:
            raise ConfigError(f"pass {o('threshold')} or {o('threshold-file')}, not both.")
        if self.threshold is not None and (
            not isinstance(self.threshold, int | float) or not math.isfinite(self.threshold)
        ):
            raise ConfigError(f"{o('threshold')} must be a finite number, got {self.threshold!r}.")
        check_confirm_options(self.confirm_generations, self.confirm_steps, self.screen_threshold, o)
        if not self.cpus_per_actor > 0:
            raise ConfigError(f"{o('cpus-per-actor')} must be > 0, got {self.cpus_per_actor!r}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"{o('dtype')} {self.dtype!r} is not one of {', '.join(DTYPES)}.")
        if self.variant is not None and not (
            isinstance(self.variant, str) and re.fullmatch(r"[A-Za-z0-9_]+", self.variant)
        ):
            raise ConfigError(
                f"{o('variant')} must be a weights variant name such as fp16 (letters, digits, _), got "
                f"{self.variant!r}."
            )


@dataclass(frozen=True, kw_only=True)
class AuditConfig(ScoreConfig, ParsedConfig):
    """Everything one audit run depends on; `to_json()` is written next to the results.

    The scoring fields are `ScoreConfig`'s (the score actor takes an AuditConfig as its ScoreConfig).
    threshold None and threshold_file None: no row is flagged (flagged = False everywhere) and the threshold
    origin is recorded as "none"; scores are still written, so a threshold can be applied later.
    gpus_per_actor is used only when the Ray cluster reports GPUs; cpus_per_actor also sets the actor's torch threads.
    num_cpus sizes a local Ray this run starts (ignored when it joins a cluster through address or RAY_ADDRESS).
    """

    inputs: tuple[str, ...]
    output: str
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    format: str | None = None
    compression: str | None = None
    # WebDataset shards with a sidecar parquet beside them: read the sidecars instead of the tars.
    read_sidecars: bool = False
    actors: int = 1
    gpus_per_actor: float = 1.0
    force: bool = False
    quiet: bool = False
    address: str | None = None
    num_cpus: int | None = None
    unit_rows: int = DEFAULT_UNIT_ROWS
    report: bool = True
    progress_interval: float = 30.0
    stall_timeout_s: float = 900.0
    lease_heartbeat_s: float = 15.0
    lease_ttl_s: float = 120.0
    break_lease: bool = False

    @staticmethod
    def option(name: str) -> str:
        """The audit's options are flags: `--batch-size`."""
        return f"--{name}"

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))
        object.__setattr__(self, "keep_columns", tuple(self.keep_columns))
        _check_common(self.inputs, self.output, self.format, self.storage_options)
        _split_format(self)
        super().__post_init__()
        if not isinstance(self.unit_rows, int) or isinstance(self.unit_rows, bool) or self.unit_rows < 1:
            raise ConfigError(f"--unit-rows must be an int >= 1, got {self.unit_rows!r}.")
        if not isinstance(self.actors, int) or self.actors < 1:
            raise ConfigError(f"--actors must be an int >= 1, got {self.actors!r}.")
        if not self.gpus_per_actor >= 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0 (0 = CPU actors), got {self.gpus_per_actor!r}.")
        if isinstance(self.progress_interval, bool) or not (
            isinstance(self.progress_interval, int | float) and self.progress_interval > 0
        ):
            raise ConfigError(
                f"--progress-interval must be a number of seconds > 0, got {self.progress_interval!r}."
            )
        if isinstance(self.stall_timeout_s, bool) or not (
            isinstance(self.stall_timeout_s, int | float) and self.stall_timeout_s > 0
        ):
            raise ConfigError(
                f"--stall-timeout-s must be a number of seconds > 0, got {self.stall_timeout_s!r}."
            )
        for name, value in (("lease-heartbeat-s", self.lease_heartbeat_s), ("lease-ttl-s", self.lease_ttl_s)):
            if isinstance(value, bool) or not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise ConfigError(f"--{name} must be a number of seconds > 0, got {value!r}.")
        if self.lease_ttl_s < 2 * self.lease_heartbeat_s:
            raise ConfigError(
                f"--lease-ttl-s {self.lease_ttl_s:g} must be at least twice --lease-heartbeat-s "
                f"{self.lease_heartbeat_s:g}, or one late heartbeat lets another run take a live run's lease; "
                "raise --lease-ttl-s or lower --lease-heartbeat-s."
            )
        if self.num_cpus is not None and self.num_cpus < 2:
            raise ConfigError(
                f"--num-cpus must be >= 2 (one CPU for the scoring actor, one for reading), got {self.num_cpus}."
            )
        clashes = sorted(set(self.keep_columns) & OUTPUT_COLUMNS)
        if clashes:
            raise ConfigError(
                f"--keep-columns {', '.join(clashes)} clash with output columns of the same name; "
                "rename them in the input or leave them out."
            )
        internal = sorted(set(self.keep_columns) & schema.INTERNAL_COLUMNS)
        if internal:
            raise ConfigError(
                f"--keep-columns {', '.join(internal)} are names of the audit's internal columns, which are never "
                "written; rename them in the input or leave them out."
            )
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise ConfigError(f"--keep-columns lists a column twice: {','.join(self.keep_columns)}.")

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        return audit_parser()


@dataclass(frozen=True, kw_only=True)
class FilterConfig(ParsedConfig):
    """`auditor filter`: apply an audit's flags to a dataset. id_column None takes the audit's own."""

    inputs: tuple[str, ...]
    audit_output: str
    output: str
    mode: str = "drop"
    format: str | None = None
    compression: str | None = None
    id_column: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    quiet: bool = False
    address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))
        _check_common(self.inputs, self.output, self.format, self.storage_options)
        _split_format(self)
        if not str(self.audit_output).strip():
            raise ConfigError(
                "AUDIT_OUTPUT must be the OUTPUT folder of `auditor audit`, got an empty string."
            )
        if self.mode not in FILTER_MODES:
            raise ConfigError(f"--mode {self.mode!r} is not one of {', '.join(FILTER_MODES)}.")

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        return filter_parser()


# Parsers ---------------------------------------------------------------------------------------------------------
def _fields_from(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the user gave (the parser uses SUPPRESS), so the dataclass defaults apply."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parse_storage_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"expected key=value, got {text!r} (e.g. endpoint_url=http://host:9000)"
        )
    lowered = value.lower()
    parsed: Any = {"true": True, "false": False}.get(lowered, value)
    return key, parsed


class _StorageOptionAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        current = dict(getattr(namespace, self.dest, None) or {})
        key, value = values
        current[key] = value
        setattr(namespace, self.dest, current)


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage and cluster")
    group.add_argument(
        "--storage-option",
        dest="storage_options",
        metavar="KEY=VALUE",
        type=parse_storage_option,
        action=_StorageOptionAction,
        default=argparse.SUPPRESS,
        help="fsspec option for every URI, repeatable (e.g. endpoint_url=http://127.0.0.1:9000 for MinIO/moto). "
        "Credentials are refused here: they come from AWS_* environment variables or the default chain",
    )
    group.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        metavar="FORMAT",
        default=argparse.SUPPRESS,
        help="input format for every file: parquet, jsonl, csv, tsv, txt or webdataset (tar shards), the text ones "
        "and tars also compressed (jsonl.gz, csv.zst, webdataset.gz, ...). Default: by extension: .parquet, "
        ".jsonl/.json/.ndjson, .csv, .tsv, .txt, .tar, each but parquet optionally followed by .gz, .bz2, .zst or "
        ".xz (.json is JSON lines; .tgz is .tar.gz)",
    )
    group.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=argparse.SUPPRESS,
        help="codec of every text input, overriding its extension and --format (none: read files as they are). "
        "Default: by extension (.gz gzip, .bz2, .zst zstd, .xz)",
    )
    group.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        help="Ray cluster to join (default: RAY_ADDRESS if set, else a new local Ray)",
    )
    group.add_argument(
        "--num-cpus",
        type=int,
        default=argparse.SUPPRESS,
        help="CPUs of the local Ray this command starts (default: all); ignored on a cluster",
    )
    group.add_argument(
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no Ray Data progress bars or INFO logs",
    )


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    d = lambda name: _default(AuditConfig, name)  # noqa: E731
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders, globs or fsspec URIs (s3://bucket/prefix/); parquet, jsonl, csv, tsv, txt or "
        "WebDataset .tar shards, all but parquet also as .gz, .bz2, .zst or .xz",
    )
    parser.add_argument(
        "output", metavar="OUTPUT", help="output folder or URI: scores/, flagged/, _audit.json"
    )
    data = parser.add_argument_group("input columns")
    data.add_argument(
        "--caption-column",
        default=argparse.SUPPRESS,
        help=f"column holding captions (default {d('caption_column')}). WebDataset shards: a member field (txt) or "
        "json:KEY, a key of the sample's .json member; the default reads a sample's .caption, else its .txt",
    )
    data.add_argument(
        "--id-column",
        default=argparse.SUPPRESS,
        help="column holding a row id (default: none; ids are <source-file>:<row>, <shard>:<key> for WebDataset). "
        "WebDataset shards also have __key__ and json:KEY columns",
    )
    data.add_argument(
        "--keep-columns",
        type=_columns,
        default=argparse.SUPPRESS,
        metavar="A,B",
        help="input columns copied to OUTPUT/scores (comma separated)",
    )
    shards = parser.add_argument_group("WebDataset shards")
    shards.add_argument(
        "--read-sidecars",
        action="store_true",
        default=argparse.SUPPRESS,
        help="where a .tar has a parquet of the same stem beside it (img2dataset's 00000.tar + 00000.parquet), read "
        "the captions from that parquet (its rows with status success, joined on key) instead of the tar: about a "
        "thousandth of the bytes, the same ids, captions and scores. Default: read the tars, what the trainer reads",
    )
    model = parser.add_argument_group("model and score")
    model.add_argument(
        "--model",
        required=True,
        help="diffusers SD folder: local path, hub id or fsspec URI (s3://bucket/model)",
    )
    model.add_argument("--variant", default=argparse.SUPPRESS, help=VARIANT_HELP)
    model.add_argument(
        "--dtype", choices=DTYPES, default=argparse.SUPPRESS, help="auto = fp16 on CUDA, fp32 on CPU"
    )
    model.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="capture CUDA graphs for the text encoder and first-step UNet (default: on for GPU actors)",
    )
    model.add_argument(
        "--generations",
        type=int,
        default=argparse.SUPPRESS,
        help=f"initial noises averaged per caption (default {d('generations')})",
    )
    model.add_argument(
        "--steps",
        type=int,
        default=argparse.SUPPRESS,
        help=f"sampler steps averaged (DDIM for SD; default {d('steps')})",
    )
    model.add_argument("--score-sigma", type=float, default=argparse.SUPPRESS, help=SCORE_SIGMA_HELP)
    model.add_argument(
        "--seed", type=int, default=argparse.SUPPRESS, help=f"noise seed (default {d('seed')})"
    )
    flag = parser.add_argument_group("flagging")
    flag.add_argument(
        "--threshold",
        type=float,
        default=argparse.SUPPRESS,
        help="flag rows with score > X. Without --threshold or --threshold-file nothing is flagged "
        "(flagged=false, threshold origin 'none'); scores are written either way",
    )
    flag.add_argument(
        "--threshold-file",
        default=argparse.SUPPRESS,
        help='JSON with {"threshold": X, ...} as written by `auditor calibrate`; its content is recorded as the origin',
    )
    add_confirm_arguments(flag)
    flag.add_argument(
        "--explain-flagged",
        action="store_true",
        default=argparse.SUPPRESS,
        help="add per-token significance (tokens, token_significance) to OUTPUT/flagged/",
    )
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--batch-size",
        type=int,
        default=argparse.SUPPRESS,
        help=f"captions per actor call and UNet batch (default {d('batch_size')})",
    )
    run.add_argument(
        "--actors", type=int, default=argparse.SUPPRESS, help=f"scoring actors (default {d('actors')})"
    )
    run.add_argument(
        "--cpus-per-actor",
        type=float,
        default=argparse.SUPPRESS,
        help=f"CPUs reserved per actor, also its torch threads (default {d('cpus_per_actor')}); "
        "actors x this + 1 must fit the cluster's CPUs",
    )
    run.add_argument(
        "--gpus-per-actor",
        type=float,
        default=argparse.SUPPRESS,
        help=f"GPUs per actor when the cluster has GPUs (default {d('gpus_per_actor')}; 0 = CPU actors)",
    )
    run.add_argument(
        "--unit-rows",
        type=int,
        default=argparse.SUPPRESS,
        help=f"rows per work unit (default {d('unit_rows')}): a parquet file is cut into units of whole row groups "
        "(a row group larger than this is a unit of its own); jsonl/csv/tsv/txt files are one unit each. A unit is "
        "committed, resumed and written as one part file",
    )
    run.add_argument(
        "--progress-interval",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds between audit progress lines in logs (default {d('progress_interval'):g}); "
        "in a terminal a bar is drawn instead",
    )
    run.add_argument(
        "--stall-timeout-s",
        type=float,
        default=argparse.SUPPRESS,
        help=f"fail (exit code 3, committed units kept) when nothing in the pipeline has moved for this many "
        f"seconds (default {d('stall_timeout_s'):g}): no read, no score batch finished, no write or commit. A slow "
        "run whose actors keep finishing batches is never stopped; a cluster that lost a node can wait forever "
        "for work it cannot schedule. Counted from the start, so keep it above the model's load time. Rerun the "
        "same command to resume",
    )
    run.add_argument(
        "--lease-heartbeat-s",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds between renewals of OUTPUT/_lease.json, the lease that keeps a second audit off this OUTPUT "
        f"(default {d('lease_heartbeat_s'):g})",
    )
    run.add_argument(
        "--lease-ttl-s",
        type=float,
        default=argparse.SUPPRESS,
        help=f"a lease whose heartbeat is older than this many seconds belongs to a dead run and is taken over "
        f"(default {d('lease_ttl_s'):g}; a lease of a run on this host whose process is gone is taken at once)",
    )
    run.add_argument(
        "--break-lease",
        action="store_true",
        default=argparse.SUPPRESS,
        help="take OUTPUT's lease at once, whoever holds it: only when you know its holder is not running",
    )
    run.add_argument(
        "--report",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="write OUTPUT/report.html at the end of the audit (default: on; --no-report turns it off)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        default=argparse.SUPPRESS,
        help="redo every input file, even those the ledger marks complete",
    )
    add_storage_arguments(parser)


CONFIRM_HELP = (
    "the two-stage audit: rows whose first-stage score is over the screening threshold are scored again with "
    "N generations x K steps of the family's own sampler (confirm_score), in the same score actor, and flagged = "
    "score > screening threshold and confirm_score > threshold. Either option turns it on (the other defaults to "
    "1); a threshold file written by `auditor calibrate --confirm-generations N --confirm-steps K` turns it on "
    "with its settings. README 'Two-stage audit'"
)


def add_confirm_arguments(group: argparse._ArgumentGroup, screen_threshold_help: str | None = None) -> None:
    """--confirm-generations, --confirm-steps, --screen-threshold: the same flags on audit, score, calibrate and
    evaluate (SUPPRESS: a value is present only when given, so the dataclass defaults stay the only defaults)."""
    group.add_argument(
        "--confirm-generations", type=int, metavar="N", default=argparse.SUPPRESS, help=CONFIRM_HELP
    )
    group.add_argument(
        "--confirm-steps",
        type=int,
        metavar="K",
        default=argparse.SUPPRESS,
        help="sampler steps of the second stage (see --confirm-generations)",
    )
    group.add_argument(
        "--screen-threshold",
        type=float,
        metavar="S",
        default=argparse.SUPPRESS,
        help=screen_threshold_help
        or "rows with a first-stage score > S get the second stage (default: the threshold file's "
        "screen_threshold, written by `auditor calibrate --confirm-...`)",
    )


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", metavar="DATASET", help="the audited dataset: files, folders, globs or URIs"
    )
    parser.add_argument(
        "audit_output", metavar="AUDIT_OUTPUT", help="OUTPUT folder of `auditor audit` (has scores/)"
    )
    parser.add_argument(
        "output", metavar="OUT", help="folder for the filtered dataset (parquet, one file per input)"
    )
    parser.add_argument(
        "--mode",
        choices=FILTER_MODES,
        default=argparse.SUPPRESS,
        help="drop: leave flagged rows out (default); mark: keep all rows, add memorization_flag/memorization_score",
    )
    parser.add_argument(
        "--id-column",
        default=argparse.SUPPRESS,
        help="id column (default: the one the audit used, from _audit.json)",
    )
    add_storage_arguments(parser)


def audit_parser(prog: str = "auditor audit") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    add_audit_arguments(parser)
    return parser


def filter_parser(prog: str = "auditor filter") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False)
    add_filter_arguments(parser)
    return parser
