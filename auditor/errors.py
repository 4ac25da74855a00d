"""The project's exception types. Imports nothing from the project."""

from __future__ import annotations


class AuditorError(Exception):
    """Base class: every error the auditor raises on purpose."""


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
