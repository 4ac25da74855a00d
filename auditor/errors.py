"""The project's exception types. Imports only auditor.redact (pure Python)."""

from __future__ import annotations

from auditor.redact import redact_text


class AuditorError(Exception):
    """Base class: every error the auditor raises on purpose. Its message is redacted (auditor.redact): messages
    name URIs and quote the errors of fsspec and aiohttp, which hold the URL a file was opened by, credentials
    included; none of that reaches a log, the terminal or _audit.json."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(a) if isinstance(a, str) else a for a in args))


class ConfigError(AuditorError, ValueError):
    """A configuration or argument is invalid; raised before any work starts."""


class ModelLoadError(AuditorError):
    """A model folder or URI cannot be used (missing component, pickle-only weights, unreachable)."""


class InputDataError(AuditorError, ValueError):
    """Input data (a caption, a file, a column) is unusable; the message names where and how to fix it."""


class AuditIncomplete(AuditorError):
    """An audit stopped before every unit was committed (stalled cluster, SIGTERM, lost driver connection).

    What was committed is kept; rerunning the same command audits the rest. The CLI exits with EXIT_CODE.
    """

    EXIT_CODE = 3
