"""auditor: find memorization-prone captions in text-to-image training data.

Importing this package imports neither ray nor torch: `auditor.Scorer`, `auditor.explain`, ... load the model
code (torch, diffusers) on first use, so the pipeline's read, write and commit workers, which import
`auditor.schema` and `auditor.io`, never pay for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditor.scoring import MitigationResult, Scorer, TokenSignificance, explain, mitigate

__all__ = ["MitigationResult", "Scorer", "TokenSignificance", "__version__", "explain", "mitigate"]
__version__ = "0.1.0"

_SCORING_EXPORTS = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _SCORING_EXPORTS:
        import auditor.scoring

        value = getattr(auditor.scoring, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'auditor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
