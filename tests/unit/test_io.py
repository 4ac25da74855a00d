"""auditor.io: listing inputs, reading every format with row numbers and statuses, shard writer, ledger."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from auditor import schema
from auditor.errors import ConfigError, InputDataError
from auditor.formats import CODEC_EXTENSIONS, strip_extensions
from auditor.io.inputs import InputFile, list_inputs, peek_columns, shard_key
from auditor.io.ledger import DONE, Ledger, unit_key
from auditor.io.parquet import commit_unit, read_shard, stage_rows
from auditor.io.readers import read_caption_batches, read_record_batches, units_of
from auditor.io.units import cut_row_groups

LOCAL = fsspec.filesystem("file")


def file_for(path, fmt: str, compression: str | None = None) -> InputFile:
    return InputFile(str(path), str(path), fmt, path.name, shard_key(str(path)), compression=compression)


def compress(data: bytes, codec: str) -> bytes:
    """data in one codec's file format, written by the standard library (zstd by fsspec's own backend)."""
    if codec == "zstd":
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        return zstd.compress(data)
    return {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec](data)


def read_all(path, fmt, **kwargs) -> pa.Table:
    return pa.concat_tables(
        read_caption_batches(LOCAL, file_for(path, fmt), "caption", batch_rows=2, **kwargs)
    )


def test_list_inputs_folder_glob_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in (
        "a.parquet",
        "b.jsonl",
        "sub/c.csv",
        "d.tsv",
        "e.txt",
        "_SUCCESS",
        ".hidden.parquet",
        "f.bin",
    ):
        (tmp_path / name).write_text("x")
    files = list_inputs((str(tmp_path),), None, {})
    assert [(f.relative, f.format) for f in files] == [
        ("a.parquet", "parquet"), ("b.jsonl", "jsonl"), ("d.tsv", "tsv"), ("e.txt", "txt"), ("sub/c.csv", "csv")
    ]  # fmt: skip
    assert [f.relative for f in list_inputs((str(tmp_path / "*.parquet"),), None, {})] == ["a.parquet"]
    both = list_inputs((str(tmp_path / "a.parquet"), str(tmp_path)), None, {})
    assert len(both) == 5  # each file once
    assert list_inputs((str(tmp_path / "f.bin"),), "csv", {})[0].format == "csv"


def test_list_inputs_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        list_inputs((str(tmp_path / "missing"),), None, {})
    (tmp_path / "x.bin").write_text("x")
    with pytest.raises(ConfigError, match="unknown extension.*--format"):
        list_inputs((str(tmp_path / "x.bin"),), None, {})
    with pytest.raises(ConfigError, match="holds no input files"):
        list_inputs((str(tmp_path),), None, {})


def test_list_inputs_compressed_text_by_double_extension(tmp_path):
    names = [
        "a.jsonl.gz",
        "b.tsv.gz",
        "c.json.zst",
        "d.txt.bz2",
        "e.csv.xz",
        "f.JSONL.GZ",
        "g.parquet.gz",
        "h.gz",
    ]
    for name in names:
        (tmp_path / name).write_text("x")
    files = list_inputs((str(tmp_path),), None, {})
    assert [(f.relative, f.format, f.compression) for f in files] == [
        ("a.jsonl.gz", "jsonl", "gzip"),
        ("b.tsv.gz", "tsv", "gzip"),
        ("c.json.zst", "jsonl", "zstd"),
        ("d.txt.bz2", "txt", "bz2"),
        ("e.csv.xz", "csv", "xz"),
        ("f.JSONL.GZ", "jsonl", "gzip"),
    ]  # fmt: skip  (compressed parquet and a bare .gz are no input files)
    # --format keeps the name's codec; --compression replaces it ("none": as it is).
    [h] = list_inputs((str(tmp_path / "h.gz"),), "csv", {})
    assert (h.format, h.compression) == ("csv", "gzip")
    [a] = list_inputs((str(tmp_path / "a.jsonl.gz"),), None, {}, "none")
    assert (a.format, a.compression) == ("jsonl", None)
    [b] = list_inputs((str(tmp_path / "b.tsv.gz"),), None, {}, "bz2")
    assert (b.format, b.compression) == ("tsv", "bz2")
    assert strip_extensions("dir/c.json.zst") == "dir/c" and strip_extensions("dir/a.b.csv") == "dir/a.b"


def test_list_inputs_refuses_compressed_parquet(tmp_path):
    (tmp_path / "g.parquet.gz").write_text("x")
    with pytest.raises(ConfigError, match=r"INPUT .*g\.parquet\.gz has an unknown extension.*\.gz, \.bz2"):
        list_inputs((str(tmp_path / "g.parquet.gz"),), None, {})
    with pytest.raises(ConfigError, match=r"read as compressed parquet \(gzip\).*--compression none"):
        list_inputs((str(tmp_path / "g.parquet.gz"),), "parquet", {})
    (tmp_path / "p.parquet").write_text("x")
    with pytest.raises(ConfigError, match=r"p\.parquet would be read as compressed parquet \(zstd\)"):
        list_inputs((str(tmp_path),), None, {}, "zstd")


JSONL = [json.dumps({"caption": f"caption {i}", "k": i}) for i in range(7)]
PLAIN = {
    "jsonl": "\n".join(JSONL[:3] + [""] + JSONL[3:]) + "\n",  # a blank line is not a row
    "csv": "caption,k\n" + "".join(f"caption {i},{i}\n" for i in range(7)),
    "tsv": "caption\tk\n" + "".join(f"caption {i}\t{i}\n" for i in range(7)),
    "txt": "".join(f"caption {i}\n" for i in range(7)),
}


@pytest.mark.parametrize(("ext", "codec"), list(CODEC_EXTENSIONS.items()))
@pytest.mark.parametrize("fmt", list(PLAIN))
def test_compressed_text_reads_like_plain_text(tmp_path, fmt, ext, codec):
    plain, packed = tmp_path / f"c.{fmt}", tmp_path / f"c.{fmt}{ext}"
    plain.write_text(PLAIN[fmt])
    packed.write_bytes(compress(PLAIN[fmt].encode(), codec))
    [listed] = list_inputs((str(packed),), None, {})
    assert (listed.format, listed.compression) == (fmt, codec)
    keep = () if fmt == "txt" else ("k",)
    want = pa.concat_tables(read_caption_batches(LOCAL, file_for(plain, fmt), "caption", keep_columns=keep))
    got = pa.concat_tables(read_caption_batches(LOCAL, listed, "caption", batch_rows=3, keep_columns=keep))
    assert got.drop_columns([schema.ID, schema.SOURCE]) == want.drop_columns([schema.ID, schema.SOURCE])
    assert got.column(schema.ROW).to_pylist() == list(range(7))  # lines of the decompressed text
    assert got.column(schema.CAPTION).to_pylist() == [f"caption {i}" for i in range(7)]
    assert peek_columns(LOCAL, listed) == (["text"] if fmt == "txt" else ["caption", "k"])
    records = pa.concat_tables(t for t, _ in read_record_batches(LOCAL, listed, batch_rows=3))
    assert records.num_rows == 7  # what `auditor filter` reads


@pytest.mark.parametrize(("ext", "codec"), list(CODEC_EXTENSIONS.items()))
def test_truncated_archive_raises_naming_the_file_and_codec(tmp_path, ext, codec):
    path = tmp_path / f"cut.jsonl{ext}"
    blob = compress(("\n".join(JSONL * 400) + "\n").encode(), codec)
    path.write_bytes(blob[: len(blob) // 2])
    [file] = list_inputs((str(path),), None, {})
    name = f"cut\\.jsonl\\{ext}"
    with pytest.raises(
        InputDataError, match=rf"{name} cannot be decompressed as {codec} \(EOFError.*truncated"
    ):
        pa.concat_tables(read_caption_batches(LOCAL, file, "caption"))
    with pytest.raises(InputDataError, match=rf"{name} cannot be decompressed as {codec}"):
        list(read_record_batches(LOCAL, file))
    path.write_bytes(b"not compressed at all\n" * 50)
    with pytest.raises(InputDataError, match=rf"{name} cannot be decompressed as {codec}.*--compression"):
        peek_columns(LOCAL, file)


def test_zstd_is_read_with_the_file_class_whatever_fsspec_registered():
    code = (
        "from fsspec.compression import compr, register_compression\n"
        "register_compression('zstd', lambda f, mode='rb': f, 'zst', force=True)\n"  # as an older fsspec
        "import auditor.io.inputs as inputs\n"
        "print(compr['zstd'] is inputs.ZstdFile and inputs.ZstdFile is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_json_array_is_refused_with_the_conversion(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"caption": "a"}, {"caption": "b"}], indent=1))
    [file] = list_inputs((str(path),), None, {})
    assert file.format == "jsonl"  # .json is JSON lines
    with pytest.raises(InputDataError, match=r"a\.json: the file holds a JSON array.*jq -c"):
        peek_columns(LOCAL, file)
    with pytest.raises(InputDataError, match=r"a\.json: the file holds a JSON array.*jq -c"):
        read_all(path, "jsonl")


def test_shard_key_never_reads_as_a_number():
    # A stem "1e" and an all-digit hash would make `1e-0123456789`: a float to polars' hive type inference.
    source = next(
        s
        for s in (f"/data/{i}/1e.jsonl" for i in range(100_000))
        if hashlib.sha1(s.encode()).hexdigest()[:10].isdigit()
    )
    key = shard_key(source)
    with pytest.raises(ValueError):
        float(key)
    assert key == f"1e-h{hashlib.sha1(source.encode()).hexdigest()[:10]}"
    assert shard_key("/data/2026.jsonl").startswith("2026-") and shard_key("/x/a.csv").startswith("a-")


def test_shard_key_is_stable_and_path_safe():
    key = shard_key("s3://bucket/dir/part=1/my file.parquet")
    assert key == shard_key("s3://bucket/dir/part=1/my file.parquet")
    assert key.startswith("my_file-") and "/" not in key and "=" not in key
    assert shard_key("s3://b/x/a.parquet") != shard_key("s3://b/y/a.parquet")


def test_parquet_rows_ids_keep_and_statuses(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"caption": ["a cat", None, "  ", "dog"], "key": [10, 11, None, 13], "u": list("wxyz")}),
        path,
    )
    t = read_all(path, "parquet", id_column="key", keep_columns=("u",))
    assert t.column(schema.ROW).to_pylist() == [0, 1, 2, 3]
    assert t.column(schema.ID).to_pylist() == ["10", "11", f"{path}:2", "13"]  # a null id falls back
    assert t.column(schema.STATUS).to_pylist() == ["ok"] * 4  # null/blank are named by the tokenize stage
    assert t.column("u").to_pylist() == list("wxyz")


def test_parquet_non_string_caption_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"caption": [1, None]}), path)
    t = read_all(path, "parquet")
    assert t.column(schema.STATUS).to_pylist() == [schema.NOT_STRING, schema.OK]
    assert "is int64, expected string" in t.column(schema.ERROR)[0].as_py()


def test_parquet_missing_column_lists_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"TEXT": ["a"], "url": ["u"]}), path)
    with pytest.raises(
        InputDataError, match=r"has no column 'caption'; columns are: TEXT, url\. Rename the column"
    ):
        read_all(path, "parquet")


BOM = "\ufeff"


@pytest.mark.parametrize(
    ("name", "fmt", "codec"),
    [("c.csv", "csv", None), ("c.csv.gz", "csv", "gzip"), ("c.tsv", "tsv", None), ("c.jsonl", "jsonl", None)],
)
def test_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name, fmt, codec):
    """Excel saves "CSV UTF-8" with a byte order mark: --caption-column caption must find 'caption', not
    '\\ufeffcaption' (the mark is invisible in a terminal, so the old message could not be acted on)."""
    sep = "\t" if fmt == "tsv" else ","
    text = (
        f"{BOM}caption{sep}n\na cat{sep}1\na dog{sep}2\n"
        if fmt != "jsonl"
        else BOM
        + json.dumps({"caption": "a cat", "n": 1})
        + "\n"
        + json.dumps({"caption": "a dog", "n": 2})
        + "\n"
    )
    path = tmp_path / name
    path.write_bytes(text.encode() if codec is None else compress(text.encode(), codec))
    file = file_for(path, fmt, codec)
    assert peek_columns(LOCAL, file) == ["caption", "n"]
    table = pa.concat_tables(read_caption_batches(LOCAL, file, "caption", keep_columns=("n",)))
    assert table.column(schema.CAPTION).to_pylist() == ["a cat", "a dog"]
    assert table.column(schema.STATUS).to_pylist() == [schema.OK, schema.OK]
    assert table.column("n").to_pylist() == ["1", "2"]
    [(records, _)] = list(read_record_batches(LOCAL, file))
    assert records.column_names == ["caption", "n"]  # what `auditor filter` writes


def test_byte_order_mark_is_not_part_of_the_first_txt_caption(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(f"{BOM}a cat\na dog\n".encode())
    assert read_all(path, "txt").column(schema.CAPTION).to_pylist() == ["a cat", "a dog"]


def test_json_array_with_a_byte_order_mark_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(f'{BOM}[{{"caption": "a"}}]\n'.encode())
    with pytest.raises(InputDataError, match=r"holds a JSON array.*jq -c"):
        read_all(path, "jsonl")


def test_jsonl_without_the_key_fails_like_a_csv_without_the_column(tmp_path):
    """No record has the key: the file fails whole, naming itself and the keys it has, as csv and parquet do."""
    (tmp_path / "c.csv").write_text("TEXT,url\na cat,u\n")
    with pytest.raises(
        InputDataError, match=r"c\.csv has no column 'caption'; columns are: TEXT, url\. Rename"
    ):
        read_all(tmp_path / "c.csv", "csv")
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ({"TEXT": "a cat"}, {"TEXT": "a dog", "url": 2})))
    with pytest.raises(
        InputDataError,
        match=r"c\.jsonl: no record has the key 'caption' \(keys are read from the first 4096 records .*\); keys "
        r"are: TEXT, url\. Give its records that key \(null where a record has no value\), or leave this file out",
    ):
        read_all(path, "jsonl")
    with pytest.raises(
        InputDataError,
        match=r"no record has the keys 'caption', 'k' \(.*\); keys are: TEXT, url\. Give its records those keys",
    ):
        read_all(path, "jsonl", keep_columns=("k",))


def test_jsonl_key_in_some_records_gives_the_others_nulls(tmp_path, monkeypatch):
    """A key some of the first records have is a column (a writer may leave out null fields); one that only appears
    after the first KEY_CHECK_RECORDS records is not. peek_columns reads the keys the same way, so the plan
    agrees with the reader."""
    from auditor.io import inputs, readers

    monkeypatch.setattr(inputs, "KEY_CHECK_RECORDS", 3)
    monkeypatch.setattr(readers, "KEY_CHECK_RECORDS", 3)
    path = tmp_path / "c.jsonl"
    records = [{"url": "u0"}, {"url": "u1"}, {"caption": "a cat", "url": "u2"}, {"url": "u3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert peek_columns(LOCAL, file_for(path, "jsonl")) == ["url", "caption"]
    # The plan passes the keys it needs: reading stops at the first record that completes them.
    assert peek_columns(LOCAL, file_for(path, "jsonl"), wanted=("url",)) == ["url"]
    table = read_all(path, "jsonl")  # batches of 2: the key's first record is in the second batch
    assert table.column(schema.CAPTION).to_pylist() == [None, None, "a cat", None]
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [records[0], records[1], "not an object", records[2]])
    )
    assert peek_columns(LOCAL, file_for(path, "jsonl")) == ["url"]
    with pytest.raises(InputDataError, match=r"no record has the key 'caption' .*; keys are: url\."):
        read_all(path, "jsonl")


def test_jsonl_bad_lines_and_types(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"caption": "a", "k": 1}), "", "{not json", json.dumps([1]), json.dumps({"caption": 5}),
             json.dumps({"k": 2})]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    t = read_all(path, "jsonl", keep_columns=("k",))
    assert t.column(schema.ROW).to_pylist() == [0, 1, 2, 3, 4]  # the blank line is not a row
    assert t.column(schema.STATUS).to_pylist() == ["ok", "bad_record", "bad_record", "not_string", "ok"]
    assert t.column(schema.CAPTION).to_pylist() == ["a", None, None, None, None]
    assert "line 3: not JSON" in t.column(schema.ERROR)[1].as_py()
    assert t.column(schema.ID).to_pylist()[0] == f"{path}:0"
    assert t.column("k").to_pylist() == ["1", None, None, None, "2"]  # jsonl keep columns are text


@pytest.mark.parametrize(("fmt", "sep"), [("csv", ","), ("tsv", "\t")])
def test_csv_tsv_read_as_strings(tmp_path, fmt, sep):
    path = tmp_path / f"c.{fmt}"
    path.write_text(
        f'caption{sep}n\n"a, quoted"{sep}1\n{sep}2\n'
        if fmt == "csv"
        else f"caption{sep}n\na b{sep}1\n{sep}2\n"
    )
    t = read_all(path, fmt, keep_columns=("n",))
    assert t.column(schema.CAPTION).to_pylist() == (["a, quoted", ""] if fmt == "csv" else ["a b", ""])
    assert t.column("n").to_pylist() == ["1", "2"]
    assert peek_columns(LOCAL, file_for(path, fmt)) == ["caption", "n"]


def test_txt_every_line_is_a_row(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"one\r\n\nthree\n\xff\xfe\n")
    t = read_all(path, "txt")
    assert t.column(schema.CAPTION).to_pylist() == ["one", "", "three", None]
    assert t.column(schema.STATUS).to_pylist() == ["ok", "ok", "ok", "bad_record"]
    with pytest.raises(InputDataError, match="txt file"):
        read_all(path, "txt", id_column="k")


def test_corrupt_parquet_raises(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputDataError, match="not readable as parquet"):
        peek_columns(LOCAL, file_for(path, "parquet"))
    with pytest.raises(pa.ArrowInvalid):
        read_all(path, "parquet")


def test_record_batches_keep_all_columns_and_row_numbers(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"caption": "a", "n": 1}\nnope\n{"caption": "b", "n": "two"}\n')
    ((table, rows),) = list(read_record_batches(LOCAL, file_for(path, "jsonl")))
    assert rows.to_pylist() == [0, 2]
    # a column with mixed JSON types is kept as text
    assert table.to_pylist() == [{"caption": "a", "n": "1"}, {"caption": "b", "n": "two"}]


ROW = {"id": "x", "caption": "c", "score": 1.0, "confirm_score": None, "flagged": True, "source": "s", "row": 0, "n_tokens": 1,
       "truncated": False, "status": "ok", "error": None}  # fmt: skip


def test_staged_rows_are_invisible_until_the_unit_commits(tmp_path):
    out = str(tmp_path / "out")
    first = stage_rows(
        LOCAL, out, "k1", 3, pa.Table.from_pylist([{**ROW, "row": 5, schema.UNIT: 3, schema.NODE: "host/1"}])
    )
    second = stage_rows(LOCAL, out, "k1", 3, pa.Table.from_pylist([{**ROW, "row": 4, "id": "y"}]))
    assert read_shard(LOCAL, f"{out}/scores", "k1", ["id"]) is None  # staged outside scores/
    parts = commit_unit(LOCAL, out, "k1", 3, [first, second], schema.flagged_schema(False))
    assert parts["rows"] == 2 and parts["scores"].endswith("scores/shard=k1/part-u000003.parquet")
    assert read_shard(LOCAL, f"{out}/scores", "k1", ["id", "row"]).to_pylist() == [
        {"id": "y", "row": 4},
        {"id": "x", "row": 5},
    ]  # row order, internal columns dropped
    assert pq.read_schema(parts["scores"]).names == schema.SCORES_SCHEMA.names  # no _unit, no _node
    assert pq.read_schema(parts["flagged"]).names == schema.flagged_schema(False).names
    assert read_shard(LOCAL, f"{out}/flagged", "k1", ["id"]).num_rows == 2
    assert not list((tmp_path / "out" / "_staging").rglob("*.parquet"))
    # A redo of the same unit replaces its part (here with no flags: the flagged part goes too).
    again = stage_rows(LOCAL, out, "k1", 3, pa.Table.from_pylist([{**ROW, "flagged": False}]))
    commit_unit(LOCAL, out, "k1", 3, [again], schema.flagged_schema(False))
    assert read_shard(LOCAL, f"{out}/scores", "k1", ["id"]).num_rows == 1
    assert read_shard(LOCAL, f"{out}/flagged", "k1", ["id"]) is None
    # An empty unit still gets its (empty) scores part, so every input file has a shard.
    commit_unit(LOCAL, out, "k2", 0, [], schema.flagged_schema(False))
    assert read_shard(LOCAL, f"{out}/scores", "k2", ["id"]).num_rows == 0


def test_units_are_whole_row_groups(tmp_path):
    units = cut_row_groups([10, 10, 10, 50, 5, 5], unit_rows=25)
    assert [(u.first_row, u.rows, u.row_groups) for u in units] == [
        (0, 20, (0, 1)),
        (20, 10, (2,)),
        (30, 50, (3,)),  # a row group larger than unit_rows is a unit of its own
        (80, 10, (4, 5)),
    ]
    assert {u.file_units for u in units} == {4} and [u.index for u in units] == [0, 1, 2, 3]
    assert [(u.first_row, u.rows) for u in cut_row_groups([], 25)] == [(0, 0)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(10)]}), path, row_group_size=3)
    units = units_of(LOCAL, file_for(path, "parquet"), unit_rows=6)
    assert [(u.first_row, u.rows, u.row_groups) for u in units] == [(0, 6, (0, 1)), (6, 4, (2, 3))]
    # Ids and row numbers of a unit read alone are those of the whole-file read.
    whole = read_all(path, "parquet")
    second = pa.concat_tables(
        read_caption_batches(LOCAL, file_for(path, "parquet"), "caption", row_groups=(2, 3), first_row=6)
    )
    assert second.to_pylist() == whole.slice(6).to_pylist()
    text = tmp_path / "a.txt"
    text.write_text("x\ny\n")
    assert [(u.index, u.file_units, u.rows) for u in units_of(LOCAL, file_for(text, "txt"), 1)] == [
        (0, 1, None)
    ]


def record(source: str, unit: int, status: str = DONE, **extra) -> dict:
    return {"source": source, "shard": source.rsplit("/", 1)[-1], "unit": unit, "status": status, **extra}


def test_ledger_newest_record_wins_and_compaction_keeps_it(tmp_path):
    ledger = Ledger(LOCAL, str(tmp_path / "out"))
    assert ledger.entries() == {}
    ledger.mark(record("s3://b/a.parquet", 0, "failed"))
    ledger.mark(record("s3://b/a.parquet", 0))
    ledger.mark(record("s3://b/a.parquet", 1))
    ledger.mark(record("s3://b/b.parquet", 0))
    (tmp_path / "out" / "_ledger" / "b-2.json").write_text(json.dumps({"source": "old", "status": DONE}))
    entries = ledger.entries()
    assert set(entries) == {("s3://b/a.parquet", 0), ("s3://b/a.parquet", 1), ("s3://b/b.parquet", 0)}
    assert entries[("s3://b/a.parquet", 0)]["status"] == DONE
    kept = ledger.compact()
    assert len(kept) == 3
    assert {unit_key(r): r for r in kept} == entries
    assert ledger.entries() == entries
    files = sorted(
        p.relative_to(tmp_path / "out" / "_ledger").as_posix()
        for p in (tmp_path / "out" / "_ledger").rglob("*")
    )
    assert [f for f in files if f.startswith("units/")] == [] and sum(
        f.startswith("compacted/") for f in files
    ) == 1
    ledger.mark(record("s3://b/a.parquet", 1, "failed"))  # after the snapshot: newer, so it wins
    assert ledger.entries()[("s3://b/a.parquet", 1)]["status"] == "failed"
    ledger.forget(["s3://b/a.parquet"])
    assert set(ledger.entries()) == {("s3://b/b.parquet", 0)}
    ledger.remove_legacy()
    assert not (tmp_path / "out" / "_ledger" / "b-2.json").exists()


EMPTY_FILES = {
    "zero.jsonl": b"",
    "blank.jsonl": b"\n  \n\n",
    "zero.csv": b"",
    "bom.csv": b"\xef\xbb\xbf\n",
    "zero.tsv": b"",
}


@pytest.mark.parametrize("name", sorted(EMPTY_FILES))
def test_a_file_with_no_records_lacks_no_column_and_reads_as_0_rows(tmp_path, name):
    """Issue 32: a writer's empty file is common; it has no header and no record, so no column is missing."""
    path = tmp_path / name
    path.write_bytes(EMPTY_FILES[name])
    file = file_for(path, name.rsplit(".", 1)[1])
    assert peek_columns(LOCAL, file, wanted=("caption",)) is None
    assert list(read_caption_batches(LOCAL, file, "caption", id_column="key")) == []
    assert list(read_record_batches(LOCAL, file)) == []  # what `auditor filter` reads


def test_an_empty_compressed_jsonl_reads_as_0_rows(tmp_path):
    path = tmp_path / "zero.jsonl.gz"
    path.write_bytes(compress(b"", "gzip"))
    [file] = list_inputs((str(path),), None, {})
    assert peek_columns(LOCAL, file) is None
    assert list(read_caption_batches(LOCAL, file, "caption")) == []


def test_a_file_with_records_still_fails_for_a_missing_key(tmp_path):
    """The other side of the rule: records without the key, or a csv header without the column, fail the file."""
    (tmp_path / "a.jsonl").write_text('{"text": "a cat"}\n')
    (tmp_path / "a.csv").write_text("text\na cat\n")
    (tmp_path / "header.csv").write_text("text\n")  # a header and no row: its columns are known
    assert peek_columns(LOCAL, file_for(tmp_path / "header.csv", "csv")) == ["text"]
    with pytest.raises(InputDataError, match=r"a\.jsonl: no record has the key 'caption'.*keys are: text"):
        read_all(tmp_path / "a.jsonl", "jsonl")
    with pytest.raises(InputDataError, match=r"a\.csv has no column 'caption'; columns are: text"):
        read_all(tmp_path / "a.csv", "csv")


def test_a_broken_csv_is_not_mistaken_for_an_empty_one(tmp_path, monkeypatch):
    """Only a file with no text is 0 rows; when pyarrow refuses one that has text, its error stands."""
    import pyarrow.csv as pacsv

    def refuse(*args, **kwargs):
        raise pa.ArrowInvalid("CSV parse error: simulated")

    (tmp_path / "a.csv").write_text("caption\na cat\n")
    monkeypatch.setattr(pacsv, "open_csv", refuse)
    with pytest.raises(pa.ArrowInvalid, match="simulated"):
        read_all(tmp_path / "a.csv", "csv")


def test_planning_passes_over_files_with_no_records(tmp_path):
    """check_columns on the files a rerun still has to do: empty ones alone (issue 32: exit 2 on every rerun) pass;
    a typo still fails on the files that have columns."""
    from auditor.config import AuditConfig
    from auditor.errors import ConfigError
    from auditor.pipeline.plan import check_columns

    for name, content in EMPTY_FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "full.jsonl").write_text('{"caption": "a cat"}\n')
    empty = [file_for(tmp_path / name, name.rsplit(".", 1)[1]) for name in sorted(EMPTY_FILES)]
    cfg = AuditConfig(inputs=(str(tmp_path),), output=str(tmp_path / "out"), model="unused")
    assert check_columns(cfg, empty) == {}
    assert check_columns(cfg, [*empty, file_for(tmp_path / "full.jsonl", "jsonl")]) == {}
    typo = AuditConfig(
        inputs=(str(tmp_path),), output=str(tmp_path / "out"), model="unused", caption_column="txt"
    )
    with pytest.raises(
        ConfigError, match=r"--caption-column 'txt' not found in .*full\.jsonl; columns are: caption"
    ):
        check_columns(typo, [*empty, file_for(tmp_path / "full.jsonl", "jsonl")])
