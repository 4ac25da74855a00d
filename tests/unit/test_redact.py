"""Credentials out of recorded URIs, options and messages (auditor.redact), and signed URLs as inputs: the format
from the URL's path, the identity without credentials. A local http.server on 127.0.0.1 serves the files (it
ignores the query and the userinfo, as a signed-URL store accepts any fresh signature)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import logging
import threading

import pyarrow as pa
import pytest

from auditor import schema
from auditor.config import AuditConfig
from auditor.errors import AuditIncomplete, ConfigError, InputDataError
from auditor.formats import split_name, strip_extensions, url_path
from auditor.io.inputs import list_inputs, peek_columns
from auditor.redact import CREDENTIAL_PARAMS, SIGNING_PARAMS, redact_text, redact_uri, redact_value

SECRET = "S3CRET-value-42"
# What the issue names, as each store spells it.
ISSUE_PARAMS = (
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "X-Goog-Signature",
    "X-Goog-Credential",
    "GoogleAccessId",
    "Signature",
    "sig",
    "token",
    "access_token",
)


def test_the_list_holds_every_credential_parameter_the_issue_names():
    assert {p.lower() for p in ISSUE_PARAMS} <= CREDENTIAL_PARAMS
    assert not CREDENTIAL_PARAMS & SIGNING_PARAMS
    assert all(p == p.lower() for p in CREDENTIAL_PARAMS | SIGNING_PARAMS)


@pytest.mark.parametrize("name", [*ISSUE_PARAMS, *(p.upper() for p in ISSUE_PARAMS), "AWSAccessKeyId"])
def test_each_credential_parameter_is_removed_whatever_its_case(name):
    uri = f"https://bucket.example.com/data/a.jsonl?versionId=7&{name}={SECRET}#part"
    assert redact_uri(uri) == "https://bucket.example.com/data/a.jsonl?versionId=7#part"


def test_userinfo_is_removed_whole_user_included():
    # The user is dropped too: `https://TOKEN@host/` puts a token where the user goes.
    assert redact_uri(f"http://reader:{SECRET}@127.0.0.1:8000/c.txt") == "http://127.0.0.1:8000/c.txt"
    assert redact_uri(f"https://{SECRET}@host/c.txt") == "https://host/c.txt"
    assert redact_uri(f"s3://key:{SECRET}@bucket/c.txt") == "s3://bucket/c.txt"


def test_a_presigned_url_loses_its_whole_signature_so_a_fresh_one_is_the_same_object():
    first = (
        "https://b.s3.amazonaws.com/k/a.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA1%2F2026"
        "&X-Amz-Date=20261206T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature=abc"
    )
    second = first.replace("AKIA1", "AKIA2").replace("20261206T", "20261207T").replace("=abc", "=def")
    assert redact_uri(first) == redact_uri(second) == "https://b.s3.amazonaws.com/k/a.parquet"
    sas = (
        "https://acct.blob.core.windows.net/c/a.csv?sv=2022-11-02&se=2026-12-07T00%3A00Z&sr=b&sp=r&sig=xyz%3D"
    )
    assert redact_uri(sas) == "https://acct.blob.core.windows.net/c/a.csv"
    gcs = "https://storage.googleapis.com/b/a.txt?GoogleAccessId=sa%40p.iam&Expires=1700000000&Signature=q%2B"
    assert redact_uri(gcs) == "https://storage.googleapis.com/b/a.txt"


def test_signing_parameters_stay_on_a_url_without_a_signature():
    assert redact_uri("https://h/a.csv?sp=1&se=2") == "https://h/a.csv?sp=1&se=2"
    assert redact_uri("/data/a?sig=1.csv") == "/data/a?sig=1.csv"  # a local path is no URI
    assert redact_uri("s3://b/a.csv") == "s3://b/a.csv"


def test_redact_text_finds_uris_and_parameters_in_library_messages():
    url = f"http://reader:{SECRET}@127.0.0.1:9/bkt/a.jsonl?X-Amz-Signature={SECRET}&X-Amz-Date=1"
    messages = [
        f"FileNotFoundError: ['{url}']",  # fsspec
        f"ClientResponseError: 403, message='Forbidden', url=URL('{url}')",  # aiohttp
        f"<MultiDict('X-Amz-Signature': '{SECRET}')>",  # yarl's parsed query
        f"{{'sig': '{SECRET}'}}",
        f"cannot reach endpoint_url=http://KEY:{SECRET}@127.0.0.1:9000, retrying",
        f"query sig={SECRET}&sp=r",
    ]
    for message in messages:
        redacted = redact_text(message)
        assert SECRET not in redacted, redacted
    assert (
        redact_text(f"FileNotFoundError: ['{url}']")
        == "FileNotFoundError: ['http://127.0.0.1:9/bkt/a.jsonl']"
    )
    assert redact_text("n_tokens: 7, no credentials here") == "n_tokens: 7, no credentials here"


def test_redact_value_walks_json_and_keeps_types():
    value = {
        "storage_options": {"endpoint_url": f"http://KEY:{SECRET}@127.0.0.1:9000", "anon": False},
        "inputs": (f"https://h/a.csv?sig={SECRET}",),
        "argv": ["auditor", "--storage-option", f"endpoint_url=http://KEY:{SECRET}@h:9000"],
        "n": 3,
    }
    redacted = redact_value(value)
    assert SECRET not in repr(redacted)
    assert redacted["storage_options"] == {"endpoint_url": "http://127.0.0.1:9000", "anon": False}
    assert redacted["inputs"] == ("https://h/a.csv",) and redacted["n"] == 3
    assert SECRET in repr(value)  # the argument is not changed


def test_auditor_errors_and_the_recorded_config_are_redacted(tmp_path):
    with pytest.raises(ConfigError, match=r"^INPUT http://127\.0\.0\.1/a\.csv is bad$"):
        raise ConfigError(f"INPUT http://u:{SECRET}@127.0.0.1/a.csv?sig={SECRET} is bad")
    with pytest.raises(AuditIncomplete, match="stopped: FileNotFoundError") as info:
        raise AuditIncomplete(f"stopped: FileNotFoundError: https://h/a?X-Goog-Signature={SECRET}")
    assert SECRET not in str(info.value)
    cfg = AuditConfig(
        inputs=(f"http://u:{SECRET}@127.0.0.1/a.txt",),
        output=str(tmp_path / "out"),
        model="m",
        storage_options={"endpoint_url": f"http://KEY:{SECRET}@127.0.0.1:9000"},
    )
    recorded = cfg.to_json()
    assert SECRET not in repr(recorded)
    assert recorded["inputs"] == ["http://127.0.0.1/a.txt"]
    assert recorded["storage_options"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert cfg.storage_options["endpoint_url"].startswith("http://KEY:")  # what the filesystems get


def test_the_format_comes_from_the_url_path_not_its_query():
    signed = "https://b.s3.amazonaws.com/k/a.jsonl.gz?X-Amz-Signature=0a.csv&X-Amz-Expires=3600"
    assert url_path(signed) == "https://b.s3.amazonaws.com/k/a.jsonl.gz"
    assert split_name(signed) == ("jsonl", "gzip")
    assert split_name("http://h/captions.txt?sig=x#frag.parquet") == ("txt", None)
    assert split_name("http://h/download?sig=a.csv") == (None, None)
    assert strip_extensions("https://h/dir/a.parquet?sig=x") == "https://h/dir/a"
    # Only http(s) URLs have a query: '?' is part of other names.
    assert (
        split_name("/data/odd?name.csv") == ("csv", None) and url_path("s3://b/a?b.txt") == "s3://b/a?b.txt"
    )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the test server's access log would print the signed URLs
        pass


@pytest.fixture
def http_root(tmp_path):
    """(folder served, base URL) of a local http.server on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_signed_and_userinfo_urls_list_with_their_credentials_only_in_path(http_root):
    root, host = http_root
    (root / "captions.txt").write_text("a cat\na dog\n")
    (root / "c.jsonl").write_text('{"caption": "x"}\n')
    userinfo = f"http://reader:{SECRET}@{host}/captions.txt"
    signed = f"http://{host}/c.jsonl?X-Amz-Credential=AKIA1&X-Amz-Date=1&X-Amz-Signature={SECRET}"
    rotated = f"http://{host}/c.jsonl?X-Amz-Credential=AKIA2&X-Amz-Date=2&X-Amz-Signature=fresh"
    files = list_inputs((userinfo, signed), None, {})
    assert [(f.source, f.path, f.format, f.relative) for f in files] == [
        (f"http://{host}/c.jsonl", signed, "jsonl", "c.jsonl"),
        (f"http://{host}/captions.txt", userinfo, "txt", "captions.txt"),
    ]
    again = list_inputs((f"http://reader:other@{host}/captions.txt", rotated), None, {})
    # A rotated password or a fresh signature: the same inputs, shards and identities (size + Last-Modified).
    assert [(f.source, f.shard, f.identity) for f in again] == [
        (f.source, f.shard, f.identity) for f in files
    ]
    assert all(f.identity.startswith("size=") for f in files)
    # Where fsspec's HTTP listing reports Last-Modified (recent fsspec; 2024.6, the lower bound, reports only the
    # size), it is part of the identity too.
    import fsspec

    if "Last-Modified" in fsspec.filesystem("http").info(f"http://{host}/captions.txt"):
        assert all("Last-Modified=" in f.identity for f in files)
    assert SECRET not in repr([(f.source, f.shard, f.relative, f.identity) for f in files])
    # --format reads a signed URL whose path has no input extension.
    plain = f"http://{host}/c.jsonl?sig={SECRET}"
    (root / "blob").write_text("one caption\n")
    assert [f.format for f in list_inputs((plain.replace("c.jsonl", "blob"),), "txt", {})] == ["txt"]
    assert list_inputs((plain,), None, {})[0].source == f"http://{host}/c.jsonl"


def test_listing_errors_about_signed_urls_do_not_echo_the_signature(http_root):
    root, host = http_root
    (root / "data.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=rf"INPUT http://{host}/data.bin has an unknown extension") as info:
        list_inputs((f"http://{host}/data.bin?sig={SECRET}",), None, {})
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigError, match=rf"INPUT http://{host}/gone.txt does not exist") as info:
        list_inputs((f"http://u:{SECRET}@{host}/gone.txt?sig={SECRET}",), None, {})
    assert SECRET not in str(info.value)


def test_a_worker_read_error_names_the_redacted_source_in_its_row_and_its_log(http_root, caplog):
    """fsspec's error quotes the URL it opened (file.path, credentials included): the READ_ERROR row and the log
    line carry the redacted text."""
    import fsspec

    from auditor.io.inputs import InputFile, shard_key
    from auditor.pipeline.stages import read_unit_rows

    root, host = http_root
    (root / "c.txt").write_text("a cat\n")
    source = f"http://{host}/c.txt"
    file = InputFile(
        source, f"http://u:{SECRET}@{host}/gone.txt?sig={SECRET}", "txt", "c.txt", shard_key(source), "size=6"
    )
    cfg = AuditConfig(inputs=(source,), output="/tmp/unused", model="m")
    with caplog.at_level(logging.DEBUG, logger="auditor"):
        tables = list(read_unit_rows(cfg, file))
    (table,) = tables
    row = table.to_pylist()[0]
    assert row[schema.STATUS] == schema.READ_ERROR and row[schema.SOURCE] == source
    assert row[schema.ERROR].startswith("FileNotFoundError") and f"{host}/gone.txt" in row[schema.ERROR]
    assert SECRET not in repr(table.to_pylist()) and SECRET not in caplog.text
    assert "gone.txt" in caplog.text
    with pytest.raises(
        InputDataError, match=rf"^{source} is not readable as jsonl: FileNotFoundError"
    ) as info:
        peek_columns(fsspec.filesystem("http"), dataclasses.replace(file, format="jsonl"))
    assert SECRET not in str(info.value)
    assert isinstance(table, pa.Table)


def test_a_model_uri_error_holds_no_credential(tmp_path, monkeypatch):
    from auditor.errors import ModelLoadError
    from auditor.io.model_store import localize_model_dir

    monkeypatch.setenv("AUDITOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match=r"model (URI|from) http://127\.0\.0\.1:9/m") as info:
        localize_model_dir(f"http://u:{SECRET}@127.0.0.1:9/m", {})
    assert SECRET not in str(info.value)
