"""Ray Job entrypoint: `ray job submit --working-dir . -- python jobs/filter.py DATASET AUDIT_OUTPUT OUT ...`.

Same flags as `auditor filter` (one parser, auditor.config); joins the job's cluster through RAY_ADDRESS.
"""

from __future__ import annotations

import logging
import sys

from auditor.config import FilterConfig
from auditor.pipeline.filter import run_filter

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_filter(FilterConfig.from_argv(sys.argv[1:]))
    logging.getLogger("jobs.filter").info("counts: %s", result.counts)
    sys.exit(result.exit_code)
