"""The model math: loading, encoding, first-step magnitude, explain, mitigate.

Pure torch/diffusers/transformers: never imports ray, pyarrow or the pipeline. The exports below load on first
use, so `auditor.scoring.tokens` (numpy only) can be imported by the pipeline's CPU stage without torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditor.scoring.explain import TokenSignificance, explain
    from auditor.scoring.mitigate import MitigationResult, mitigate
    from auditor.scoring.scorer import Scorer, TokenizedCaptions

# name -> the submodule that defines it
_EXPORTS = {
    "MitigationResult": "mitigate",
    "Scorer": "scorer",
    "TokenSignificance": "explain",
    "TokenizedCaptions": "scorer",
    "explain": "explain",
    "mitigate": "mitigate",
}
__all__ = ["MitigationResult", "Scorer", "TokenSignificance", "TokenizedCaptions", "explain", "mitigate"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'auditor.scoring' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"auditor.scoring.{_EXPORTS[name]}"), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _ScoringPackage(types.ModuleType):
    # `explain` and `mitigate` name both a submodule and its function. The import system binds a submodule on its
    # package once loaded; the package keeps the function there instead, as it did when it imported it eagerly.
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _ScoringPackage
