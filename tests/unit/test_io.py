"""auditor.io: listing inputs, reading every format with row numbers and statuses, shard writer, ledger."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from auditor import schema
from auditor.errors import ConfigError, InputDataError
from auditor.io.inputs import InputFile, list_inputs, peek_columns, shard_key
from auditor.io.ledger import DONE, Ledger
from auditor.io.parquet import ShardWriter, read_shard
from auditor.io.readers import read_caption_batches, read_record_batches

LOCAL = fsspec.filesystem("file")


def file_for(path, fmt: str) -> InputFile:
    return InputFile(str(path), str(path), fmt, path.name, shard_key(str(path)))


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
    with pytest.raises(InputDataError, match="no column caption; columns are: TEXT, url"):
        read_all(path, "parquet")


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


def test_shard_writer_commit_abort(tmp_path):
    root = str(tmp_path / "scores")
    s = schema.scores_schema()
    writer = ShardWriter(LOCAL, root, "k1", s, keep_empty=True)
    row = {"id": "x", "caption": "c", "score": 1.0, "flagged": False, "source": "s", "row": 0, "n_tokens": 1,
           "truncated": False, "status": "ok", "error": None}  # fmt: skip
    writer.write(pa.Table.from_pylist([row]))
    assert read_shard(LOCAL, root, "k1", ["id"]) is None  # not visible before commit
    assert writer.commit()
    assert read_shard(LOCAL, root, "k1", ["id"]).column("id").to_pylist() == ["x"]
    empty = ShardWriter(LOCAL, root, "k2", s, keep_empty=False)
    assert not empty.commit() and not (tmp_path / "scores" / "shard=k2" / "part-0.parquet").exists()
    aborted = ShardWriter(LOCAL, root, "k3", s, keep_empty=True)
    aborted.write(pa.Table.from_pylist([row]))
    aborted.abort()
    assert list((tmp_path / "scores" / "shard=k3").iterdir()) == []


def test_ledger_round_trip(tmp_path):
    ledger = Ledger(LOCAL, str(tmp_path / "out"))
    assert ledger.entries() == {}
    ledger.mark({"source": "s3://b/a.parquet", "shard": "a-1", "status": DONE, "fingerprint": "f"})
    ledger.mark({"source": "s3://b/b.parquet", "shard": "b-2", "status": "failed", "fingerprint": "f"})
    assert set(ledger.entries()) == {"s3://b/a.parquet", "s3://b/b.parquet"}
    ledger.unmark("a-1")
    assert set(ledger.entries()) == {"s3://b/b.parquet"}
