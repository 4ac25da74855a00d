"""Credentials out of every URI, option and message the auditor records: the one redaction that outputs, the
ledger, `_audit.json`, the report, logs and error messages go through. Pure Python (re only); imports nothing.

An input is often handed over as a URL that carries its own credentials: userinfo (`http://user:SECRET@host/a`),
or a signed query (S3 presigned, GCS signed, Azure SAS). The reading needs them; no output may hold them. The
URI without them is also the input's identity (the `source` column, ids, the ledger), so a fresh signature for
the same object is the same input.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

# Query parameters whose value is a credential (a signature, a key id, a token); compared case-insensitively.
CREDENTIAL_PARAMS = frozenset(
    {
        "x-amz-signature",  # S3 presigned (SigV4)
        "x-amz-credential",  # S3 presigned: the access key id
        "x-amz-security-token",  # S3 presigned with temporary credentials
        "awsaccesskeyid",  # S3 presigned (SigV2)
        "x-goog-signature",  # GCS signed (V4)
        "x-goog-credential",  # GCS signed (V4): the service account
        "googleaccessid",  # GCS signed (V2): the service account
        "signature",  # GCS signed (V2), S3 SigV2, CloudFront
        "sig",  # Azure SAS
        "token",
        "access_token",
    }
)
# Parameters that are not secret but belong to a signature and change each time a URL is signed (dates, expiry,
# algorithm, Azure SAS fields). Dropped only from a URL that carries a CREDENTIAL_PARAMS one, so that a fresh
# presigned URL of the same object has the same identity; any other URL keeps them (they may name the object).
SIGNING_PARAMS = frozenset(
    {
        "x-amz-algorithm",
        "x-amz-date",
        "x-amz-expires",
        "x-amz-signedheaders",
        "x-goog-algorithm",
        "x-goog-date",
        "x-goog-expires",
        "x-goog-signedheaders",
        "expires",  # S3 SigV2, GCS V2, CloudFront
        "key-pair-id",  # CloudFront
        "policy",  # CloudFront
        # Azure SAS: version, services, resource types, permissions, start/expiry, protocol, IP range, resource,
        # the user delegation key's fields, stored access policy, encryption scope.
        *("sv", "ss", "srt", "sp", "st", "se", "spr", "sip", "sr", "si", "ses", "sdd"),
        *("skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid"),
    }
)
# scheme://authority: the authority runs to the first /, ? or #; its userinfo is everything before its last @.
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#]*)(?P<rest>.*)$", re.DOTALL)
# A URI inside free text (an error message, a log line, an argv entry such as endpoint_url=http://...): up to the
# first blank, quote or bracket that ends it in the messages of fsspec, aiohttp, botocore and Python's reprs.
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`\\\]\[)(,;|{}]+")
# A credential parameter outside any URI (a query echoed on its own, a repr of parsed parameters).
_PARAM_IN_TEXT = re.compile(
    r"(?i)(?<![\w-])("
    + "|".join(re.escape(p) for p in sorted(CREDENTIAL_PARAMS))
    + r")(['\"]?\s*[=:]\s*['\"]?)"
    r"[^\s&'\",;)}\]]+"
)
REDACTED = "REDACTED"


def _param_name(pair: str) -> str:
    return unquote_plus(pair.split("=", 1)[0]).strip().lower()


def redact_uri(uri: str) -> str:
    """The URI without credentials: no userinfo (user names are credentials too, as in https://TOKEN@host), no
    CREDENTIAL_PARAMS, and no SIGNING_PARAMS when it had one. Everything else is kept as written (order, encoding,
    fragment). Not a URI (a local path): returned as it is.

    'http://u:pw@h/a.txt?X-Amz-Date=1&X-Amz-Signature=f&v=2' -> 'http://h/a.txt?v=2'
    """
    match = _URI.match(uri)
    if match is None:
        return uri
    authority = match["authority"].rpartition("@")[2]
    rest = match["rest"]
    path, question, query = rest.partition("?")
    if question:
        query, hash_mark, fragment = query.partition("#")
        pairs = [p for p in query.split("&") if p]
        names = [_param_name(p) for p in pairs]
        signed = any(n in CREDENTIAL_PARAMS for n in names)
        dropped = CREDENTIAL_PARAMS | SIGNING_PARAMS if signed else CREDENTIAL_PARAMS
        kept = [p for p, n in zip(pairs, names, strict=True) if n not in dropped]
        rest = path + ("?" + "&".join(kept) if kept else "") + hash_mark + fragment
    return f"{match['scheme']}{authority}{rest}"


def redact_text(text: str) -> str:
    """Free text (a message, a log line, an argv entry) with every URI in it redacted (redact_uri), and any
    credential parameter left outside a URI (`sig=...`) given the value REDACTED."""
    if "://" in text:
        text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group()), text)
    return _PARAM_IN_TEXT.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)


def redact_value(value: Any) -> Any:
    """A JSON-like value (a config, argv, storage options, a summary) with redact_text applied to every string in
    it, dict keys included; other values as they are. A new value; the argument is not changed."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value
