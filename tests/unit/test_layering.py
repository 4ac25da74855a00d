"""One-way dependencies: scoring, io, config and the plain-Python pipeline steps never import ray."""

from __future__ import annotations

import subprocess
import sys


def test_scoring_io_config_do_not_import_ray():
    code = (
        "import sys\n"
        "import auditor, auditor.scoring, auditor.config, auditor.schema\n"
        "import auditor.io.inputs, auditor.io.readers, auditor.io.parquet, auditor.io.ledger, auditor.io.storage\n"
        "import auditor.pipeline.plan, auditor.pipeline.tokenize, auditor.pipeline.stages, auditor.pipeline.commit\n"
        "import auditor.cli\n"
        "auditor.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"ray imported: {out.stdout[:200]}"
