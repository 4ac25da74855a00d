"""Ray Job entrypoint: `ray job submit --working-dir . -- python jobs/audit.py INPUT OUTPUT --model M ...`.

Same flags as `auditor audit` (one parser, auditor.config); joins the job's cluster through RAY_ADDRESS.
Exit codes as the CLI's: 0 done, 1 some units failed, 2 configuration error, 3 stopped early (rerun to resume).
"""

from __future__ import annotations

import logging
import sys

from auditor.config import AuditConfig
from auditor.errors import AuditorError
from auditor.pipeline.audit import run
from auditor.pipeline.plan import no_threshold_note

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("jobs.audit")
    try:
        cfg = AuditConfig.from_argv(sys.argv[1:])
        result = run(cfg)
    except AuditorError as exc:
        log.error("%s", exc)
        sys.exit(getattr(exc, "EXIT_CODE", 2))
    log.info("failed units: %s", result.failed_units or "none")
    if note := no_threshold_note(cfg):
        log.warning("%s", note)
    sys.exit(result.exit_code)
