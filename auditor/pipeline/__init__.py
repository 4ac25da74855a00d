"""Ray Data wiring: build the dataset, the actor that wraps the Scorer, run(cfg). The only package that imports ray.

`auditor.pipeline.run(cfg)` / `run_filter(cfg)` load `auditor.pipeline.audit` / `.filter` (and ray) on first use,
so the plain-Python steps (plan, tokenize, stages, sink) stay importable without paying for `import ray`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run", "run_filter"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from auditor.pipeline.audit import run

        return run
    if name == "run_filter":
        from auditor.pipeline.filter import run_filter

        return run_filter
    raise AttributeError(f"module 'auditor.pipeline' has no attribute {name!r}")
