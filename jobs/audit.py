"""Ray Job entrypoint: `ray job submit --working-dir . -- python jobs/audit.py INPUT OUTPUT --model M ...`.

Same flags as `auditor audit` (one parser, auditor.config); joins the job's cluster through RAY_ADDRESS.
"""

from __future__ import annotations

import logging
import sys

from auditor.config import AuditConfig
from auditor.pipeline.audit import run

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(AuditConfig.from_argv(sys.argv[1:]))
    logging.getLogger("jobs.audit").info("failed inputs: %s", result.failed or "none")
    sys.exit(result.exit_code)
