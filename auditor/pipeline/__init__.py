"""Ray Data wiring: build the dataset, the actor that wraps the Scorer, run(cfg). The only package that imports ray.

Import `auditor.pipeline.audit` / `auditor.pipeline.filter` for `run` / `run_filter`; this file imports nothing,
so the plain-Python parts (plan, tokenize, stages, sink) stay usable without paying for `import ray`.
"""
