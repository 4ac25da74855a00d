"""The model math: loading, encoding, first-step magnitude, explain, mitigate.

Pure torch/diffusers/transformers: never imports ray, pyarrow or the pipeline.
"""

from __future__ import annotations

from auditor.scoring.explain import TokenSignificance, explain
from auditor.scoring.mitigate import MitigationResult, mitigate
from auditor.scoring.scorer import Scorer, TokenizedCaptions

__all__ = ["MitigationResult", "Scorer", "TokenSignificance", "TokenizedCaptions", "explain", "mitigate"]
