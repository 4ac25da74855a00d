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
