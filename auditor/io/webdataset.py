"""WebDataset tar shards as audit input: samples streamed front to back one at a time, never an image decoded,
never a shard in memory. tarfile/pyarrow/fsspec only.

A sample is a run of consecutive regular-file members sharing a key, as webdataset defines it: the member path up
to the first dot of its base name (`dir.v2/0001.seg.png` -> key `dir.v2/0001`, field `seg.png`; fields are
lower-cased). A row is a sample; its columns are `__key__`, its fields (`txt`, `json`, ... as UTF-8 text) and
`json:<name>`, a key of its `.json` member. Members of no sample (directories, links, names without a dot, macOS
`._*` and `__MACOSX/` entries) are skipped and counted. A key seen again after other keys is a sample of its own
(webdataset makes it one too), named `<key>#<n>` for its n-th reappearance, so no row is merged or lost and every
sample of a shard has its own name. Ids default to `<shard>:<sample name>`: a sidecar parquet keyed the same way
gives the same ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.compression import compr
from fsspec.spec import AbstractFileSystem

from auditor import schema
from auditor.errors import InputDataError
from auditor.formats import strip_extensions
from auditor.io.format_reader import (
    ERROR_FIELD,
    STATUS_FIELD,
    SYNTHETIC_ID_FIELD,
    Companion,
    FilterWriter,
    FormatReader,
    Verdicts,
)
from auditor.io.inputs import SIDECAR_FORMAT, InputFile, open_input
from auditor.io.storage import join
from auditor.redact import redact_text

logger = logging.getLogger(__name__)

KEY_FIELD = "__key__"  # the sample's name, as webdataset and Ray Data's read_webdataset call it
JSON_FIELD = "json"
JSON_PREFIX = "json:"  # --caption-column json:caption reads the key `caption` of the sample's .json member
CAPTION_FIELD = "txt"  # the caption member webdataset users and img2dataset write
# --caption-column's default ("caption") reads a sample's .caption member, or its .txt member when it has none.
CAPTION_ALIAS = "caption"
# Samples whose fields and .json keys stand for a shard's columns (a tar has no header): a requested column none of
# them has fails the shard, as a missing csv column does. Their images are streamed past, not kept.
KEY_CHECK_SAMPLES = 64
REPEAT_MARK = "#"
# Errors a broken tar raises while it is streamed (truncated, corrupt, not a tar, a broken codec underneath).
TAR_ERRORS = (tarfile.TarError, EOFError, OSError)


@dataclass
class Member:
    """One member of a sample: its original header, its field name, and its bytes (None: not read or no file).
    field None: a member of no sample (a directory, a name without a dot) kept in place for the writer."""

    info: tarfile.TarInfo
    field: str | None
    data: bytes | None


@dataclass
class Sample:
    """name: unique in its shard (the key, `<key>#<n>` when the key reappears); index: its position in the shard."""

    name: str
    key: str
    index: int
    members: list[Member] = field(default_factory=list)
    duplicate_field: str | None = None  # a field that appears twice (webdataset refuses such a sample)

    def data(self, name: str) -> bytes | None:
        return next((m.data for m in self.members if m.field == name), None)

    def fields(self) -> list[str]:
        return [m.field for m in self.members if m.field is not None]


@dataclass
class ShardStats:
    """What a stream met besides samples: skipped members by reason, keys seen again."""

    skipped: Counter = field(default_factory=Counter)
    repeated_keys: int = 0

    def describe(self) -> str:
        parts = [f"{n} {reason}" for reason, n in sorted(self.skipped.items())]
        if self.repeated_keys:
            parts.append(f"{self.repeated_keys} keys seen again after other keys (read as samples <key>#<n>)")
        return "; ".join(parts)


def split_member_name(name: str) -> tuple[str, str] | str:
    """(key, field) of a member name, or why it belongs to no sample."""
    base = name.rsplit("/", 1)[-1]
    if name.startswith("__MACOSX/") or base.startswith("._"):
        return "macOS metadata members skipped"
    if base.startswith(".") or "." not in base:
        return "members without a field extension skipped"
    stem, _, suffix = base.partition(".")
    return name[: len(name) - len(base)] + stem, suffix.lower()


def iter_samples(
    fh: IO[bytes], wanted: Callable[[str], bool], stats: ShardStats | None = None, keep_loose: bool = False
) -> Iterator[Sample | Member]:
    """The samples of one tar stream in order. wanted(field): whether a member's bytes are read (the others are
    streamed past). keep_loose: members of no sample come too, read whole, in their place (after the sample they
    follow, or alone before the first sample); else they are only counted. Memory: one sample's read bytes, plus
    one name per key seen (to spot reappearing keys)."""
    stats = stats if stats is not None else ShardStats()
    seen: Counter = Counter()
    current: Sample | None = None
    index = 0
    first = fh.read(1)
    if not first:  # a 0-byte shard: no samples (tarfile refuses it as an "empty file")
        return
    with tarfile.open(fileobj=_Prefixed(first, fh), mode="r|*", tarinfo=_CheckedTarInfo) as tar:
        for info in tar:
            tar.members = []  # a stream's TarFile keeps every header it met otherwise
            parsed = split_member_name(info.name) if info.isfile() else "non-file members skipped"
            if isinstance(parsed, str):
                stats.skipped[parsed] += 1
                if keep_loose:
                    extracted = tar.extractfile(info) if info.isfile() else None
                    loose = Member(info, None, extracted.read() if extracted is not None else None)
                    if current is None:
                        yield loose
                    else:
                        current.members.append(loose)
                continue
            key, name = parsed
            if current is None or key != current.key:
                if current is not None:
                    yield current
                    index += 1
                repeat = seen[key]
                seen[key] += 1
                stats.repeated_keys += bool(repeat)
                current = Sample(key if not repeat else f"{key}{REPEAT_MARK}{repeat}", key, index)
            if name in current.fields():
                current.duplicate_field = name
            extracted = tar.extractfile(info) if wanted(name) else None
            current.members.append(Member(info, name, extracted.read() if extracted is not None else None))
        if current is not None:
            yield current


def iter_only_samples(fh: IO[bytes], wanted: Callable[[str], bool], stats: ShardStats) -> Iterator[Sample]:
    for item in iter_samples(fh, wanted, stats):
        assert isinstance(item, Sample)  # members of no sample come only with keep_loose
        yield item


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile ends a stream quietly at a header that is cut short, missing or garbage anywhere but at byte 0, so a
    truncated or corrupt shard would read as a shorter one. Only the end-of-archive marker (a zero block) ends a
    shard here; any other bad header raises ReadError."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as exc:
            raise tarfile.ReadError(f"unexpected end of data ({exc})") from None
        except tarfile.InvalidHeaderError as exc:
            raise tarfile.ReadError(f"invalid header after byte {tar.offset} ({exc})") from None


class _Prefixed:
    """A stream with its first bytes already read put back in front (all tarfile's stream mode calls is read)."""

    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        self.prefix, self.rest = prefix, rest

    def read(self, size: int = -1) -> bytes:
        if not self.prefix:
            return self.rest.read(size)
        head, self.prefix = self.prefix, b""
        if size is None or size < 0:
            return head + self.rest.read()
        return head + self.rest.read(size - len(head)) if size > len(head) else head


def tar_error(file: InputFile, exc: BaseException) -> str:
    return (
        f"{file.source} is not a readable tar ({type(exc).__name__}: {redact_text(str(exc))}): the shard is "
        "truncated or corrupt, or not a tar. Replace it, or leave it out of INPUT."
    )


def columns_of_sample(sample: Sample) -> list[str]:
    """The column names a sample offers: __key__, its fields, the keys of its .json member (unreadable: none)."""
    names = [KEY_FIELD, *sample.fields()]
    if CAPTION_FIELD in names and CAPTION_ALIAS not in names:
        names.append(CAPTION_ALIAS)
    document = _json_of(sample)[0]
    if isinstance(document, dict):
        names.extend(f"{JSON_PREFIX}{k}" for k in document)
    return names


def _json_of(sample: Sample) -> tuple[Any, str | None]:
    """(the parsed .json member or None, the parse error or None)."""
    raw = sample.data(JSON_FIELD)
    if raw is None:
        return None, None
    try:
        return json.loads(raw), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"sample {sample.name}: .json member is not JSON ({exc})"


def _needed_fields(names: Sequence[str]) -> set[str]:
    fields = {n for n in names if n != KEY_FIELD and not n.startswith(JSON_PREFIX)}
    if CAPTION_ALIAS in fields:
        fields.add(CAPTION_FIELD)
    if any(n.startswith(JSON_PREFIX) for n in names):
        fields.add(JSON_FIELD)
    return fields


def missing_fields_error(file: InputFile, missing: list[str], present: list[str]) -> str:
    names = ", ".join(repr(name) for name in missing)
    return (
        f"{file.source}: no sample of its first {KEY_CHECK_SAMPLES} has the field {names} (a WebDataset shard's "
        f"columns are __key__, its member fields and json:<key> for the keys of its .json members); columns are: "
        f"{', '.join(present) or '(none)'}. Pass --caption-column txt or json:<key>, or leave this shard out."
    )


class WebDatasetReader(FormatReader):
    """WebDataset tars (`.tar`, `.tar.gz`, `.tgz`, any codec): one work unit per shard, row = sample index."""

    name = "webdataset"

    def columns(
        self, fs: AbstractFileSystem, file: InputFile, wanted: Sequence[str] = ()
    ) -> list[str] | None:
        """Column names of the first KEY_CHECK_SAMPLES samples (fewer once every wanted name is seen); None for a
        shard without samples (it lacks no column: 0 rows, not a shard without the caption field)."""
        names: dict[str, None] = {}
        try:
            with open_input(fs, file) as fh:
                samples = iter_only_samples(fh, lambda f: f == JSON_FIELD, ShardStats())
                for count, sample in enumerate(samples, start=1):
                    names.update(dict.fromkeys(columns_of_sample(sample)))
                    if count == KEY_CHECK_SAMPLES or (wanted and all(n in names for n in wanted)):
                        break
        except TAR_ERRORS as exc:
            raise InputDataError(tar_error(file, exc)) from exc
        return list(names) if names else None

    def missing_error(self, file: InputFile, missing: list[str], present: list[str]) -> str:
        return missing_fields_error(file, missing, present)

    def caption_tables(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        wanted: list[str],
        batch_rows: int,
        row_groups: Sequence[int] | None = None,
    ) -> Iterator[pa.Table]:
        self.check_row_groups(file, row_groups)
        needed = _needed_fields(wanted) | {JSON_FIELD}
        stats = ShardStats()
        try:
            with open_input(fs, file) as fh:
                samples = iter_only_samples(fh, needed.__contains__, stats)
                head: list[Sample] = []
                for sample in samples:
                    head.append(sample)
                    if len(head) == KEY_CHECK_SAMPLES:
                        break
                seen = list(dict.fromkeys(n for s in head for n in columns_of_sample(s)))
                missing = [n for n in wanted if n not in seen]
                if head and missing:
                    raise InputDataError(missing_fields_error(file, missing, seen))
                chunk: list[Sample] = []
                for sample in _chain(head, samples):
                    chunk.append(sample)
                    if len(chunk) == batch_rows:
                        yield sample_table(file, chunk, wanted)
                        chunk = []
                if chunk:
                    yield sample_table(file, chunk, wanted)
        except TAR_ERRORS as exc:
            raise InputDataError(tar_error(file, exc)) from exc
        if stats.skipped or stats.repeated_keys:
            logger.info("%s: %s", file.source, stats.describe())

    def record_batches(
        self, fs: AbstractFileSystem, file: InputFile, batch_rows: int
    ) -> Iterator[tuple[pa.Table, pa.Array]]:
        raise InputDataError(
            f"{file.source} is a WebDataset shard: `auditor filter` writes cleaned tar shards for it, not parquet."
        )


# img2dataset's sidecar parquet: one row per URL tried, in download-completion order; the tar holds the rows whose
# status is success. Its columns are the .json member's keys (url, caption, key, status, ...).
SIDECAR_KEY = "key"
SIDECAR_CAPTION = "caption"
SIDECAR_STATUS = "status"
SIDECAR_SUCCESS = "success"


def sidecar_column(name: str) -> str:
    """The sidecar column holding what a shard's column holds: __key__ -> key, txt -> caption, json:K -> K."""
    if name == KEY_FIELD:
        return SIDECAR_KEY
    if name in (CAPTION_FIELD, CAPTION_ALIAS):
        return SIDECAR_CAPTION
    return name.removeprefix(JSON_PREFIX)


def _as_text(column: pa.ChunkedArray) -> pa.Array:
    """A column as the tar reader gives it: strings as they are, other values as their JSON text."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    return pa.array(
        [v if v is None or isinstance(v, str) else json.dumps(v) for v in column.to_pylist()],
        type=pa.string(),
    )


class SidecarReader(FormatReader):
    """A WebDataset shard read from its sidecar parquet (auditor.io.inputs.pair_sidecars): only rows with status
    success (the samples in the tar), ids `<tar>:<key>` as the tar reader makes them. row: the row's position among
    those rows in the parquet (completion order), not its sample index in the tar."""

    name = SIDECAR_FORMAT

    def _names(self, fs: AbstractFileSystem, file: InputFile) -> list[str]:
        with fs.open(file.path, "rb") as fh:
            return list(pq.read_schema(fh).names)

    def columns(self, fs: AbstractFileSystem, file: InputFile, wanted: Sequence[str] = ()) -> list[str]:
        try:
            names = self._names(fs, file)
        except Exception as exc:  # pyarrow and fsspec raise many types for an unreadable parquet
            raise InputDataError(
                f"{file.source}: its sidecar is not readable parquet ({type(exc).__name__}: "
                f"{redact_text(str(exc))})"
            ) from exc
        shown = [KEY_FIELD] if SIDECAR_KEY in names else []
        shown += [CAPTION_FIELD, CAPTION_ALIAS] if SIDECAR_CAPTION in names else []
        return [*shown, *(f"{JSON_PREFIX}{n}" for n in names)]

    def missing_error(self, file: InputFile, missing: list[str], present: list[str]) -> str:
        return (
            f"{file.source}: its sidecar parquet has no column for {', '.join(repr(n) for n in missing)} (__key__ "
            f"is its key column, txt its caption column, json:K its column K); columns are: {', '.join(present)}. "
            "Read the tars instead (leave out --read-sidecars), or pass a column the sidecar has."
        )

    def caption_tables(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        wanted: list[str],
        batch_rows: int,
        row_groups: Sequence[int] | None = None,
    ) -> Iterator[pa.Table]:
        self.check_row_groups(file, row_groups)
        with fs.open(file.path, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            names = parquet.schema_arrow.names
            present = self.columns(fs, file)
            missing = [n for n in wanted if n not in present]
            if SIDECAR_KEY not in names or missing:
                raise InputDataError(self.missing_error(file, missing or [KEY_FIELD], present))
            has_status = SIDECAR_STATUS in names
            read = list(dict.fromkeys([*(sidecar_column(n) for n in wanted), SIDECAR_KEY]))
            read += [SIDECAR_STATUS] if has_status and SIDECAR_STATUS not in read else []
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=read):
                table = pa.Table.from_batches([batch])
                if has_status:
                    table = table.filter(pc.equal(table.column(SIDECAR_STATUS), SIDECAR_SUCCESS))
                keys = table.column(SIDECAR_KEY).cast(pa.string())
                arrays = {
                    name: table.column(sidecar_column(name))
                    if name == wanted[0] and name != KEY_FIELD
                    else _as_text(table.column(sidecar_column(name)))
                    for name in dict.fromkeys(wanted)
                }
                arrays[SYNTHETIC_ID_FIELD] = pa.array(
                    [f"{file.source}:{k}" for k in keys.to_pylist()], type=pa.string()
                )
                yield pa.table(arrays)

    def record_batches(
        self, fs: AbstractFileSystem, file: InputFile, batch_rows: int
    ) -> Iterator[tuple[pa.Table, pa.Array]]:
        raise InputDataError(f"{file.source}: `auditor filter` reads WebDataset shards from their tars.")


def _chain(head: list[Sample], rest: Iterator[Sample]) -> Iterator[Sample]:
    # Pops the head as it goes, so a checked sample's bytes are freed once its row is built.
    while head:
        yield head.pop(0)
    yield from rest


def sample_table(file: InputFile, samples: list[Sample], wanted: list[str]) -> pa.Table:
    """Rows of the wanted columns (wanted[0]: the caption) with status, error and the synthetic id."""
    names = list(dict.fromkeys(wanted))
    columns: dict[str, list[Any]] = {name: [] for name in names}
    status: list[str | None] = []
    errors: list[str | None] = []
    for sample in samples:
        problems: list[str] = []
        not_string = None
        document, json_error = (
            _json_of(sample) if any(n.startswith(JSON_PREFIX) for n in wanted) else (None, None)
        )
        if json_error and any(n.startswith(JSON_PREFIX) for n in wanted):
            problems.append(json_error)
        if sample.duplicate_field:
            problems.append(f"sample {sample.name}: field {sample.duplicate_field!r} appears twice")
        for name in names:
            value: Any
            if name == KEY_FIELD:
                value = sample.name
            elif name.startswith(JSON_PREFIX):
                value = document.get(name[len(JSON_PREFIX) :]) if isinstance(document, dict) else None
                if name == wanted[0] and value is not None and not isinstance(value, str):
                    not_string = f"caption is {type(value).__name__} ({value!r:.60}), expected a string"
                    value = None
                elif value is not None and not isinstance(value, str):
                    value = json.dumps(value)
            else:
                member = name
                if name == CAPTION_ALIAS and CAPTION_ALIAS not in sample.fields():
                    member = CAPTION_FIELD
                raw = sample.data(member)
                try:
                    value = None if raw is None else raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    problems.append(f"sample {sample.name}: .{member} is not UTF-8 ({exc})")
                    value = None
            columns[name].append(value)
        if problems:
            status.append(schema.BAD_RECORD)
            errors.append("; ".join(problems))
        elif not_string:
            status.append(schema.NOT_STRING)
            errors.append(not_string)
        else:
            status.append(None)
            errors.append(None)
    arrays = {name: pa.array(values, type=pa.string()) for name, values in columns.items()}
    arrays[STATUS_FIELD] = pa.array(status, type=pa.string())
    arrays[ERROR_FIELD] = pa.array(errors, type=pa.string())
    arrays[SYNTHETIC_ID_FIELD] = pa.array([f"{file.source}:{s.name}" for s in samples], type=pa.string())
    return pa.table(arrays)


# Cleaned shards for `auditor filter` ----------------------------------------------------------------------------
def sample_id(file: InputFile, sample: Sample, id_column: str | None) -> str:
    """The id the audit gave this sample: its id column's value, else `<shard>:<sample name>`."""
    synthetic = f"{file.source}:{sample.name}"
    if not id_column:
        return synthetic
    # The id column after another, as the audit read it: a json: id that is no string is its JSON text there.
    value = sample_table(file, [sample], [KEY_FIELD, id_column]).column(id_column)[0].as_py()
    return synthetic if value is None else value


def write_cleaned_shard(
    fs: AbstractFileSystem,
    file: InputFile,
    out: IO[bytes],
    drop: Callable[[Sample], bool],
) -> tuple[int, int, list[str]]:
    """Copy the shard to out (a binary stream, compressed by the caller as the input was) without the samples
    drop() says: every kept member's original header and bytes, in the original order; members of no sample kept
    in place. Returns (samples read, samples written, keys of the dropped samples). Memory: one sample."""
    read = written = 0
    dropped: list[str] = []
    try:
        with (
            open_input(fs, file) as fh,
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for item in iter_samples(fh, lambda _: True, keep_loose=True):
                members = [item] if isinstance(item, Member) else item.members
                if isinstance(item, Sample):
                    read += 1
                    if drop(item):
                        dropped.append(item.key)
                        members = [m for m in item.members if m.field is None]
                    else:
                        written += 1
                for member in members:
                    tar.addfile(member.info, io.BytesIO(member.data) if member.data is not None else None)
    except TAR_ERRORS as exc:
        raise InputDataError(tar_error(file, exc)) from exc
    return read, written, dropped


def read_samples(fs: AbstractFileSystem, file: InputFile, fields: set[str]) -> Iterator[Sample]:
    """The shard's samples with only these fields' bytes read: what `--mode mark` reads."""
    try:
        with open_input(fs, file) as fh:
            yield from iter_only_samples(fh, fields.__contains__, ShardStats())
    except TAR_ERRORS as exc:
        raise InputDataError(tar_error(file, exc)) from exc


@contextlib.contextmanager
def compressed_like(out: IO[bytes], file: InputFile) -> Iterator[IO[bytes]]:
    """out compressed with the input shard's codec (a .tar.gz shard is cleaned into a .tar.gz), fsspec's codecs."""
    if file.compression is None:
        yield out
        return
    with compr[file.compression](out, mode="wb") as stream:
        yield stream


class TarShardWriter(FilterWriter):
    """Drop mode: OUT/<path under DATASET>, a tar of the same name (and codec) holding every sample not flagged,
    member by member as the input had it (write_cleaned_shard). Mark mode: the tars stay as they are;
    OUT/<path without extensions>.parquet has one row per sample: __key__, id, memorization_flag,
    memorization_score, for trainers that filter as they read."""

    def target(self, root: str, file: InputFile, mode: str) -> str:
        if mode == "drop":
            return join(root, file.relative)
        return join(root, f"{strip_extensions(file.relative)}.parquet")

    def write(
        self,
        fs: AbstractFileSystem,
        file: InputFile,
        out: IO[bytes],
        verdicts: Verdicts,
        mode: str,
        id_column: str | None,
        summary: dict[str, Any],
    ) -> list[Companion]:
        lookup = verdicts.lookup()
        flags: list[bool | None] = []
        scores: list[float | None] = []
        names: list[str] = []
        ids: list[str] = []

        def judge(sample: Sample) -> bool:
            identity = sample_id(file, sample, id_column)
            flag, score = lookup.get(identity, (None, None))
            summary["rows"] += 1
            summary["unaudited"] += identity not in lookup
            summary["flagged"] += bool(flag)
            if mode == "mark":
                names.append(sample.name)
                ids.append(identity)
                flags.append(flag)
                scores.append(score)
            return bool(flag)

        if mode == "drop":
            with compressed_like(out, file) as stream:
                _, written, dropped = write_cleaned_shard(fs, file, stream, judge)
            summary["written"] += written
            if not file.sidecar:
                return []
            name = f"{strip_extensions(file.relative).rsplit('/', 1)[-1]}.parquet"
            return [
                Companion(name, lambda handle: write_cleaned_sidecar(fs, file.sidecar, handle, set(dropped)))
            ]
        for sample in read_samples(fs, file, _needed_fields([id_column]) if id_column else set()):
            judge(sample)
        table = pa.table(
            {
                KEY_FIELD: pa.array(names, pa.string()),
                schema.ID: pa.array(ids, pa.string()),
                schema.MEMORIZATION_FLAG: pa.array(flags, pa.bool_()),
                schema.MEMORIZATION_SCORE: pa.array(scores, pa.float32()),
            }
        )
        pq.write_table(table, out)
        summary["written"] += table.num_rows
        return []


def write_cleaned_sidecar(fs: AbstractFileSystem, path: str, out: IO[bytes], dropped: set[str]) -> None:
    """The sidecar parquet at path without the rows of the dropped samples (joined on its key column); its other
    rows (failed downloads included) and columns as they are."""
    writer = None
    with fs.open(path, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        for batch in parquet.iter_batches():
            table = pa.Table.from_batches([batch])
            keys = table.column(SIDECAR_KEY).cast(pa.string())
            table = table.filter(
                pc.invert(pc.fill_null(pc.is_in(keys, pa.array(sorted(dropped), pa.string())), False))
            )
            writer = writer or pq.ParquetWriter(out, parquet.schema_arrow)
            writer.write_table(table)
    if writer is None:
        pq.write_table(parquet.schema_arrow.empty_table(), out)
    else:
        writer.close()
