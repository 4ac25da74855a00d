"""One-way dependencies: scoring, io, config and the plain-Python pipeline steps never import ray; the modules the
read/tokenize, write and commit workers load never import torch or diffusers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import auditor

SHIPPED_TOY = Path(auditor.__file__).parent / "toy" / "weights" / "full-seed0"


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


def test_worker_modules_do_not_import_torch_or_diffusers():
    """What a read/tokenize, write or commit worker runs: the stage functions' modules (and audit.py, where the
    commit task lives), plus loading the tokenizer and tokenizing. Only the score actor may load torch."""
    code = (
        "import sys\n"
        "import auditor, auditor.schema, auditor.config, auditor.histogram\n"
        "import auditor.io.inputs, auditor.io.readers, auditor.io.parquet, auditor.io.ledger, auditor.io.units\n"
        "import auditor.scoring.tokens, auditor.scoring.loading\n"
        "import auditor.pipeline.plan, auditor.pipeline.tokenize, auditor.pipeline.stages, auditor.pipeline.commit\n"
        "import auditor.pipeline.progress, auditor.pipeline.audit\n"
        "from auditor.pipeline.tokenize import CaptionTokenizer\n"
        f"tokens = CaptionTokenizer.from_model({str(SHIPPED_TOY)!r}).tokenize(['a photo of a cat'])\n"
        "assert int(tokens.n_tokens[0]) > 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"torch/diffusers imported: {out.stdout[:200]}"


def test_audit_versions_come_from_package_metadata_without_importing_torch():
    """_audit.json's versions: the driver reads them from the installed packages, never by importing the model
    stack (that cost every `auditor audit` about 10 CPU-seconds)."""
    code = (
        "import sys\n"
        "from auditor.pipeline.summary import versions\n"
        "found = versions()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
        "import diffusers, pyarrow, ray, torch, transformers\n"
        "for module in (diffusers, pyarrow, ray, torch, transformers):\n"
        "    assert found[module.__name__] == module.__version__, (module.__name__, found)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"imported to read versions: {out.stdout[:200]}"


def test_lazy_exports_still_work():
    """`auditor.Scorer`, `from auditor.scoring import explain` give the objects, even after the submodules of
    the same name were imported first."""
    code = (
        "import auditor.scoring.explain, auditor.scoring.mitigate\n"
        "import auditor\n"
        "from auditor.scoring import explain, mitigate, Scorer, TokenizedCaptions, TokenSignificance\n"
        "from auditor import MitigationResult\n"
        "assert callable(explain) and callable(mitigate), (explain, mitigate)\n"
        "assert auditor.explain is explain and auditor.mitigate is mitigate and auditor.Scorer is Scorer\n"
        "assert auditor.scoring.explain is explain\n"
        "assert Scorer.__name__ == 'Scorer' and MitigationResult.__name__ == 'MitigationResult'\n"
        "from auditor.scoring import magnitude\n"
        "assert magnitude.__name__ == 'auditor.scoring.magnitude'\n"
        "try:\n"
        "    auditor.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('auditor.no_such_name resolved')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
