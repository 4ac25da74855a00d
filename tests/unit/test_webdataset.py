"""WebDataset tar shards as input (auditor.io.webdataset): shards written by webdataset.TarWriter and by GNU tar,
samples, fields, json keys, statuses and broken shards. No Ray."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from auditor import schema
from auditor.config import AuditConfig
from auditor.errors import ConfigError, InputDataError
from auditor.io.filter_writers import writer_for
from auditor.io.format_reader import Verdicts
from auditor.io.inputs import expand_braces, list_inputs
from auditor.io.readers import columns_of, read_caption_batches, read_record_batches, units_of
from auditor.io.webdataset import split_member_name
from auditor.pipeline.plan import check_columns

LOCAL = fsspec.filesystem("file")
GNU_TAR = shutil.which("tar")


def image_bytes(i: int) -> bytes:
    """Stand-in image bytes (never decoded): not UTF-8, some kB."""
    return bytes([0xFF, 0xD8, 0xFF, i % 256]) + os.urandom(2048)


def write_shard(path, n: int = 5, start: int = 0) -> list[dict]:
    """A shard as webdataset.TarWriter writes it (img2dataset's fields: jpg, txt, json)."""
    samples = []
    with wds.TarWriter(str(path)) as sink:
        for i in range(start, start + n):
            sample = {
                "__key__": f"{i:09d}",
                "jpg": image_bytes(i),
                "txt": f"caption {i}",
                "json": {"caption": f"json caption {i}", "url": f"http://x/{i}.jpg", "width": i},
            }
            sink.write(sample)
            samples.append(sample)
    return samples


def read_tar(path, caption="caption", **kwargs) -> pa.Table:
    [file] = list_inputs((str(path),), None, {})
    return pa.concat_tables(read_caption_batches(LOCAL, file, caption, batch_rows=2, **kwargs))


def test_tarwriter_shard_reads_one_row_per_sample(tmp_path):
    path = tmp_path / "00000.tar"
    samples = write_shard(path)
    [file] = list_inputs((str(tmp_path),), None, {})
    assert (file.format, file.compression) == ("webdataset", None)
    table = read_tar(path)
    # The default --caption-column (caption) reads the .txt member; ids are <shard>:<key>; row = sample index.
    assert table.column(schema.CAPTION).to_pylist() == [s["txt"] for s in samples]
    assert table.column(schema.ID).to_pylist() == [f"{file.source}:{s['__key__']}" for s in samples]
    assert table.column(schema.ROW).to_pylist() == list(range(5))
    assert set(table.column(schema.STATUS).to_pylist()) == {schema.OK}
    assert units_of(LOCAL, file, 1)[0].rows is None
    columns = columns_of(LOCAL, file)
    assert columns[:4] == ["__key__", "jpg", "json", "txt"]
    assert {"caption", "json:caption", "json:url", "json:width"} <= set(columns)


def test_json_fields_key_and_keep_columns(tmp_path):
    path = tmp_path / "s.tar"
    samples = write_shard(path, n=3)
    table = read_tar(
        path, "json:caption", id_column="__key__", keep_columns=("json:url", "json:width", "txt")
    )
    assert table.column(schema.CAPTION).to_pylist() == [s["json"]["caption"] for s in samples]
    assert table.column(schema.ID).to_pylist() == [s["__key__"] for s in samples]
    assert table.column("json:url").to_pylist() == [s["json"]["url"] for s in samples]
    assert table.column("json:width").to_pylist() == ["0", "1", "2"]  # JSON text, as jsonl keep columns
    assert table.column("txt").to_pylist() == [s["txt"] for s in samples]


def test_gnu_tar_shards_plain_and_compressed_read_alike(tmp_path):
    if GNU_TAR is None:
        pytest.fail("GNU tar is needed to write test shards")
    src = tmp_path / "src"
    (src / "sub.v2").mkdir(parents=True)
    for i in range(4):
        (src / "sub.v2" / f"{i:04d}.txt").write_text(f"cap {i}")
        (src / "sub.v2" / f"{i:04d}.seg.png").write_bytes(image_bytes(i))
    (src / "README").write_text("no dot: belongs to no sample")
    out = tmp_path / "out"
    out.mkdir()
    for name, flags in (("a.tar", "cf"), ("b.tar.gz", "czf"), ("c.tgz", "czf")):
        subprocess.run(
            [GNU_TAR, "--sort=name", "-C", str(src), f"-{flags}", str(out / name), "."], check=True
        )
    files = list_inputs((str(out),), None, {})
    assert [(f.relative, f.format, f.compression) for f in files] == [
        ("a.tar", "webdataset", None),
        ("b.tar.gz", "webdataset", "gzip"),
        ("c.tgz", "webdataset", "gzip"),
    ]
    tables = [
        pa.concat_tables(read_caption_batches(LOCAL, f, "txt", keep_columns=("__key__",))) for f in files
    ]
    for table in tables:
        # Dots in folder names are part of the key; the field is everything after the base name's first dot.
        assert table.column("__key__").to_pylist() == [f"./sub.v2/{i:04d}" for i in range(4)]
        assert table.column(schema.CAPTION).to_pylist() == [f"cap {i}" for i in range(4)]
    assert "seg.png" in columns_of(LOCAL, files[0])


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_bad_samples_get_statuses_and_nothing_is_lost(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        add_member(tar, "a.txt", b"first a")
        add_member(tar, "a.json", b'{"caption": 1}')
        add_member(tar, "b.jpg", image_bytes(1))  # no caption member: null caption
        add_member(tar, "c.txt", b"\xff\xfe not utf-8")
        add_member(tar, "._c.txt", b"macOS metadata")
        add_member(tar, "d.txt", b"d")
        add_member(tar, "d.json", b"{not json")
        add_member(tar, "a.txt", b"a again")  # key a after other keys: a sample of its own
        add_member(tar, "e.txt", b"e1")
        add_member(tar, "e.txt", b"e2")  # the same field twice in one sample
        add_member(tar, "NODOT", b"belongs to no sample")
    table = read_tar(path, keep_columns=("__key__",))
    assert table.column("__key__").to_pylist() == ["a", "b", "c", "d", "a#1", "e"]
    assert len(set(table.column(schema.ID).to_pylist())) == 6
    assert table.column(schema.CAPTION).to_pylist() == ["first a", None, None, "d", "a again", "e1"]
    status = table.column(schema.STATUS).to_pylist()
    assert status == [schema.OK, schema.OK, schema.BAD_RECORD, schema.OK, schema.OK, schema.BAD_RECORD]
    errors = table.column(schema.ERROR).to_pylist()
    assert "not UTF-8" in errors[2] and "appears twice" in errors[5]
    # A .json that does not parse is a bad record when a json: column is read, and a caption that is no string
    # is not_string.
    table = read_tar(path, "json:caption")
    assert table.column(schema.STATUS).to_pylist()[:4] == [
        schema.NOT_STRING,
        schema.OK,
        schema.OK,
        schema.BAD_RECORD,
    ]
    assert "not JSON" in table.column(schema.ERROR).to_pylist()[3]


def test_member_names_as_webdataset_splits_them():
    assert split_member_name("dir.v2/0001.seg.png") == ("dir.v2/0001", "seg.png")
    assert split_member_name("0001.JPG") == ("0001", "jpg")
    assert isinstance(split_member_name("dir/README"), str)
    assert isinstance(split_member_name("__MACOSX/a.txt"), str)
    assert isinstance(split_member_name("d/._0001.jpg"), str)


def test_empty_shards_have_no_rows(tmp_path):
    (tmp_path / "zero.tar").write_bytes(b"")
    with tarfile.open(tmp_path / "nomembers.tar", "w"):
        pass
    for name in ("zero.tar", "nomembers.tar"):
        assert list(_batches(tmp_path / name)) == []
        [file] = list_inputs((str(tmp_path / name),), None, {})
        # Nothing to lack a column: the plan reads it as 0 rows, not as a shard without the caption field.
        assert columns_of(LOCAL, file, ["txt", "json:url"]) is None


def _batches(path):
    [file] = list_inputs((str(path),), None, {})
    return read_caption_batches(LOCAL, file, "caption")


def test_truncated_or_corrupt_shard_fails_naming_the_tar_error(tmp_path):
    path = tmp_path / "cut.tar"
    write_shard(path, n=20)
    path.write_bytes(path.read_bytes()[:30000])
    with pytest.raises(
        InputDataError, match=r"cut\.tar is not a readable tar \(ReadError: .*truncated or corrupt"
    ):
        list(_batches(path))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar" * 100)
    [junk] = list_inputs((str(tmp_path / "junk.tar"),), None, {})
    with pytest.raises(InputDataError, match=r"junk\.tar is not a readable tar \(ReadError: invalid header"):
        columns_of(LOCAL, junk)


def test_a_field_no_sample_has_lists_fields_and_json_keys(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, n=2)
    with pytest.raises(
        InputDataError, match=r"no sample .* has the field 'prompt'.*columns are: __key__, jpg, json"
    ):
        list(read_caption_batches(LOCAL, list_inputs((str(path),), None, {})[0], "prompt"))
    cfg = AuditConfig(
        inputs=(str(path),), output=str(tmp_path / "out"), model="m", caption_column="json:prompt"
    )
    with pytest.raises(
        ConfigError, match=r"--caption-column 'json:prompt' not found in .*json:caption, json:url"
    ):
        check_columns(cfg, list_inputs((str(path),), None, {}))


def test_filter_records_are_not_read_from_tars(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, n=1)
    with pytest.raises(InputDataError, match="writes cleaned tar shards"):
        list(read_record_batches(LOCAL, list_inputs((str(path),), None, {})[0]))


def verdicts_for(file, flagged_names: set[str], names: list[str]) -> Verdicts:
    ids = [f"{file.source}:{n}" for n in names]
    return Verdicts(
        pa.table(
            {
                schema.ID: ids,
                schema.FLAGGED: [n in flagged_names for n in names],
                schema.SCORE: pa.array([float(i) for i in range(len(names))], pa.float32()),
            }
        ),
        True,
    )


def members_of(path) -> list[tuple[str, bytes | None, int, int]]:
    with tarfile.open(path, "r:*") as tar:
        return [
            (m.name, tar.extractfile(m).read() if m.isfile() else None, m.mode, int(m.mtime)) for m in tar
        ]


@pytest.mark.parametrize("name", ["00000.tar", "00001.tar.gz"])
def test_cleaned_shard_keeps_every_other_member_byte_identical_in_order(tmp_path, name):
    src = tmp_path / "src"
    src.mkdir()
    path = src / name
    with tarfile.open(path, "w:gz" if name.endswith("gz") else "w") as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(6):
            for field, data in (("jpg", image_bytes(i)), ("txt", f"cap {i}".encode())):
                info = tarfile.TarInfo(f"d/{i:03d}.{field}")
                info.size, info.mode, info.mtime = len(data), 0o640, 1_700_000_000 + i
                tar.addfile(info, io.BytesIO(data))
    [file] = list_inputs((str(path),), None, {})
    names = [f"d/{i:03d}" for i in range(6)]
    flagged = {"d/001", "d/004"}
    summary = {"rows": 0, "flagged": 0, "written": 0, "unaudited": 0}
    writer = writer_for(file)
    out = tmp_path / "out" / name
    out.parent.mkdir()
    assert writer.target(str(tmp_path / "out"), file, "drop") == str(out)
    with open(out, "wb") as handle:
        writer.write(LOCAL, file, handle, verdicts_for(file, flagged, names), "drop", None, summary)
    assert summary == {"rows": 6, "flagged": 2, "written": 4, "unaudited": 0}
    expected = [m for m in members_of(path) if not any(m[0].startswith(f"{k}.") for k in flagged)]
    assert members_of(out) == expected  # names, bytes, modes and mtimes, in the input's order
    # The readers trainers use read the cleaned shard: exactly the unflagged keys.
    kept = list(wds.WebDataset(str(out), shardshuffle=False))
    assert [s["__key__"] for s in kept] == [n for n in names if n not in flagged]
    assert all(s["jpg"] == dict((m[0], m[1]) for m in expected)[f"{s['__key__']}.jpg"] for s in kept)

    marked = tmp_path / "mark.parquet"
    summary = dict.fromkeys(summary, 0)
    with open(marked, "wb") as handle:
        writer.write(LOCAL, file, handle, verdicts_for(file, flagged, names), "mark", None, summary)
    table = pq.read_table(marked)
    assert table.column("__key__").to_pylist() == names
    assert table.column(schema.MEMORIZATION_FLAG).to_pylist() == [n in flagged for n in names]
    assert writer.target("/o", file, "mark") == f"/o/{name.split('.')[0]}.parquet"


def test_cleaning_a_truncated_shard_fails_naming_it(tmp_path):
    path = tmp_path / "cut.tar"
    write_shard(path, n=20)
    path.write_bytes(path.read_bytes()[:30000])
    [file] = list_inputs((str(path),), None, {})
    counts = dict.fromkeys(("rows", "flagged", "written", "unaudited"), 0)
    nothing = Verdicts(pa.table({schema.ID: pa.array([], pa.string())}), False)
    with (
        pytest.raises(InputDataError, match=r"cut\.tar is not a readable tar"),
        open(tmp_path / "o.tar", "wb") as handle,
    ):
        writer_for(file).write(LOCAL, file, handle, nothing, "drop", None, counts)


def write_img2dataset_layout(root, n: int = 8, failed: int = 3) -> list[dict]:
    """img2dataset's output layout, made here: 00000.tar (TarWriter), 00000.parquet with one row per URL tried in
    completion order (failed downloads are in it, not in the tar) and a pretty-printed 00000_stats.json."""
    root.mkdir(parents=True, exist_ok=True)
    samples = write_shard(root / "00000.tar", n=n)
    rows = [
        {"url": s["json"]["url"], "caption": s["txt"], "key": s["__key__"], "status": "success", "width": i}
        for i, s in enumerate(samples)
    ]
    rows += [
        {"url": f"http://x/f{i}", "caption": f"failed {i}", "key": f"9{i:08d}", "status": "failed_to_download",
         "width": None}
        for i in range(failed)
    ]  # fmt: skip
    order = (
        [rows[i] for i in (5, 9, 0, 7, 2, 8, 1, 10, 6, 3, 4)[: len(rows)]] if len(rows) == 11 else rows[::-1]
    )
    pq.write_table(pa.Table.from_pylist(order), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": n + failed, "successes": n}, indent=4))
    return samples


def test_sidecar_layout_is_read_one_way_with_the_same_ids_and_captions(tmp_path, caplog):
    samples = write_img2dataset_layout(tmp_path / "shards")
    caplog.set_level("INFO")
    [tar] = list_inputs((str(tmp_path / "shards"),), None, {})
    assert (tar.format, tar.sidecar) == ("webdataset", str(tmp_path / "shards" / "00000.parquet"))
    assert "reading their tars" in caplog.text
    [side] = list_inputs((str(tmp_path / "shards"),), None, {}, read_sidecars=True)
    assert (side.source, side.format, side.path) == (tar.source, "webdataset_sidecar", tar.sidecar)
    assert "reading their sidecars" in caplog.text
    keep = ("json:url", "json:width", "__key__")
    both = [
        pa.concat_tables(read_caption_batches(LOCAL, f, caption, keep_columns=keep, batch_rows=3))
        for f in (tar, side)
        for caption in ("caption", "txt")
    ]
    columns = [schema.ID, schema.CAPTION, schema.STATUS, *keep]
    rows = [sorted(zip(*(t.column(c).to_pylist() for c in columns), strict=True)) for t in both]
    assert rows[0] == rows[1] == rows[2] == rows[3]
    assert [r[1] for r in rows[0]] == [s["txt"] for s in samples]  # failed downloads are counted nowhere
    ids = pa.concat_tables(read_caption_batches(LOCAL, side, "json:caption", id_column="__key__"))
    assert sorted(ids.column(schema.ID).to_pylist()) == [s["__key__"] for s in samples]
    assert {"__key__", "txt", "json:url", "json:status"} <= set(columns_of(LOCAL, side))


def test_sidecar_without_the_column_or_key_fails(tmp_path):
    write_img2dataset_layout(tmp_path / "s")
    [side] = list_inputs((str(tmp_path / "s"),), None, {}, read_sidecars=True)
    with pytest.raises(
        InputDataError, match=r"sidecar parquet has no column for 'jpg'.*columns are: __key__, txt"
    ):
        list(read_caption_batches(LOCAL, side, "jpg"))
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "s" / "00000.parquet")
    with pytest.raises(InputDataError, match=r"no column for '__key__'"):
        list(read_caption_batches(LOCAL, side, "caption"))
    (tmp_path / "s" / "00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputDataError, match=r"its sidecar is not readable parquet"):
        columns_of(LOCAL, side)
    with pytest.raises(InputDataError, match=r"reads WebDataset shards from their tars"):
        list(read_record_batches(LOCAL, side))


def test_cleaned_sidecar_loses_only_the_dropped_samples_rows(tmp_path):
    samples = write_img2dataset_layout(tmp_path / "in")
    [file] = list_inputs((str(tmp_path / "in"),), None, {})
    names = [s["__key__"] for s in samples]
    flagged = {names[1], names[6]}
    summary = dict.fromkeys(("rows", "flagged", "written", "unaudited"), 0)
    with open(tmp_path / "00000.tar", "wb") as handle:
        [companion] = writer_for(file).write(
            LOCAL, file, handle, verdicts_for(file, flagged, names), "drop", None, summary
        )
    assert companion.name == "00000.parquet"
    with open(tmp_path / "00000.parquet", "wb") as handle:
        companion.write(handle)
    before = pq.read_table(tmp_path / "in" / "00000.parquet").to_pylist()
    after = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert after == [r for r in before if r["key"] not in flagged]  # failed rows and the order kept


# Brace ranges in INPUT (every format) ---------------------------------------------------------------------------
def test_brace_ranges_and_lists_name_files_of_every_format(tmp_path):
    for i in range(4):
        write_shard(tmp_path / f"{i:05d}.tar", n=1)
    for name in ("a", "b"):
        pq.write_table(pa.table({"caption": [name]}), tmp_path / f"{name}.parquet")
    (tmp_path / "c.jsonl").write_text('{"caption": "c"}\n')

    def names(*specs: str) -> list[str]:
        return [f.relative for f in list_inputs(specs, None, {})]

    assert names(f"{tmp_path}/{{00001..00003}}.tar") == ["00001.tar", "00002.tar", "00003.tar"]
    # Relative paths are under the fixed part before the first brace; each file once, sorted.
    assert names(f"{tmp_path}/{{a,b}}.parquet", f"{tmp_path}/{{c.jsonl,a.parquet}}") == [
        "a.parquet",
        "b.parquet",
        "c.jsonl",
    ]
    assert expand_braces("s3://b/{00..02}/{x,y}.tar") == [
        f"s3://b/{d}/{n}.tar" for d in ("00", "01", "02") for n in ("x", "y")
    ]
    assert expand_braces("s3://b/{8..10}.tar") == ["s3://b/8.tar", "s3://b/9.tar", "s3://b/10.tar"]
    assert expand_braces("s3://b/{key}.tar") == ["s3://b/{key}.tar"]  # no range, no list: a name
    with pytest.raises(
        ConfigError, match=r"1 of the 2 names its braces stand for do not exist: .*/00004\.tar"
    ):
        names(f"{tmp_path}/{{00003..00004}}.tar")
    with pytest.raises(ConfigError, match=r"the range \{00009..00003\} must go up"):
        names(f"{tmp_path}/{{00009..00003}}.tar")
    with pytest.raises(ConfigError, match=r"\{a..c\} is no range"):
        names(f"{tmp_path}/{{a..c}}.tar")


def test_brace_lists_past_the_limit_and_unknown_formats_are_refused(tmp_path, monkeypatch):
    import auditor.io.inputs as inputs
    from auditor.io.readers import reader_for

    monkeypatch.setattr(inputs, "MAX_BRACE_NAMES", 10)
    with pytest.raises(
        ConfigError, match=r"the range \{0..10\} must go up, from START to END \(at most 10 names"
    ):
        expand_braces("s3://b/{0..10}.tar")
    with pytest.raises(ConfigError, match=r"names 12 files; at most 10"):
        expand_braces("s3://b/{0..3}/{a,b,c}.tar")
    write_shard(tmp_path / "s.tar", n=1)
    [file] = list_inputs((str(tmp_path / "s.tar"),), None, {})
    with pytest.raises(InputDataError, match=r"row groups exist only in parquet, not in webdataset"):
        list(read_caption_batches(LOCAL, file, "txt", row_groups=(0,)))
    with pytest.raises(InputDataError, match=r"s\.tar: unknown format 'xls'"):
        reader_for(dataclasses.replace(file, format="xls"))


def test_cleaning_joins_on_a_json_id_column_as_the_audit_read_it(tmp_path):
    path = tmp_path / "s.tar"
    samples = write_shard(path, n=4)
    [file] = list_inputs((str(path),), None, {})
    # json:width is an int in the .json member: the audit's id is its JSON text, and so is the filter's.
    ids = pa.concat_tables(read_caption_batches(LOCAL, file, "txt", id_column="json:width")).column(schema.ID)
    assert ids.to_pylist() == ["0", "1", "2", "3"]
    verdicts = Verdicts(
        pa.table(
            {schema.ID: ids, schema.FLAGGED: [False, True, False, False], schema.SCORE: [0.0, 1.0, 0.0, 0.0]}
        ),
        True,
    )
    summary = dict.fromkeys(("rows", "flagged", "written", "unaudited"), 0)
    with open(tmp_path / "out.tar", "wb") as handle:
        writer_for(file).write(LOCAL, file, handle, verdicts, "drop", "json:width", summary)
    assert summary == {"rows": 4, "flagged": 1, "written": 3, "unaudited": 0}
    kept = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "out.tar"), shardshuffle=False)]
    assert kept == [samples[i]["__key__"] for i in (0, 2, 3)]
