"""auditor: find memorization-prone captions in text-to-image training data.

Importing this package never imports ray; the pipeline is imported only when an audit runs.
"""

from __future__ import annotations

from auditor.scoring import MitigationResult, Scorer, TokenSignificance, explain, mitigate

__all__ = ["MitigationResult", "Scorer", "TokenSignificance", "__version__", "explain", "mitigate"]
__version__ = "0.1.0"
