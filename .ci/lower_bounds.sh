#!/usr/bin/env bash
# Lower-bounds check: does auditor work with the OLDEST versions pyproject.toml accepts?
#
# A cluster image often pins older releases than a fresh `pip install` picks, and pip keeps them when they satisfy
# our ranges, so each `>=X` in [project].dependencies is a promise. This script builds a second virtualenv
# ($MIN_VENV, default .venv-min, rebuilt from scratch whenever the pins change) with every dependency pinned to exactly its lower
# bound: the pins are generated from pyproject.toml by .ci/min_requirements.py (`>=X` -> `==X`), so the check
# cannot drift from the declared ranges. torch is the exception ($TORCH, default the CPU wheel this workplace ships:
# torch==2.13.0), because the lowest torch has no wheel for every Python we run on. Of the test extras only pytest
# and pytest-timeout are installed (at their lower bounds), for the tests below.
#
# In that venv it then
#   1. runs the unit tests that need no extras and no toy training (TESTS below),
#   2. scores captions with both shipped toys (`auditor score`, the SD toy and the SD3 toy) and compares the
#      scores with the same command in the reference venv ($REFERENCE_PY, default .venv/bin/python: what
#      `make install` picked) to 1e-4: a version that loads the weights or tokenizes differently fails here,
#   3. runs one small audit on local Ray (`auditor audit`, 340 captions of the SD toy's manifest) and checks that
#      every row was scored with the scores of step 2.
# Any failure exits non-zero and fails CI (.ci/run). Run it alone with `make test-lower-bounds`.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_VENV=${MIN_VENV:-.venv-min}
REFERENCE_PY=${REFERENCE_PY:-.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
PY=$MIN_VENV/bin/python
# Unit tests that need none of the test extras beyond pytest (no moto, chromium, kubernetes-validate, xdist) and
# train no toy: the scorer and every model family (the tiny models are saved and reloaded by the old versions), model
# loading, tokenizing, the pipeline's stages without Ray, config and CLI, report.
TESTS=(
  tests/unit/test_scorer.py tests/unit/test_families.py tests/unit/test_loading.py
  tests/unit/test_pipeline_actor.py tests/unit/test_shared_prefix.py tests/unit/test_toy_shipped.py
  tests/unit/test_toy_flow_shipped.py tests/unit/test_config.py tests/unit/test_cli.py tests/unit/test_report.py
  tests/unit/test_layering.py tests/unit/test_version_compat.py tests/unit/test_model_folders.py
  tests/unit/test_redact.py
  # moto (a test extra) is not installed here.
  --deselect tests/unit/test_report.py::test_report_on_s3
  # transformers 4.40's `import transformers` imports torch (its utils.generic), so the tokenize workers load torch
  # there: more memory per CPU worker, the same ids and scores (README, Tests).
  --deselect tests/unit/test_layering.py::test_worker_modules_do_not_import_torch_or_diffusers
)
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false

test -x "$REFERENCE_PY" || { echo "lower bounds: no reference venv at $REFERENCE_PY; run make install first"; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$SECONDS

echo "== lower bounds: $MIN_VENV with every dependency at its declared minimum"
python3 .ci/min_requirements.py test --only pytest --only pytest-timeout --override "$TORCH" >"$WORK/pins.txt"
if cmp -s "$WORK/pins.txt" "$MIN_VENV/pins.txt"; then
  echo "  $MIN_VENV already holds these pins (a clean clone, as in CI, always builds it)"
else
  python3 -m venv --clear "$MIN_VENV"
  "$PY" -m pip install -q --upgrade pip setuptools
  "$PY" -m pip install -q -r "$WORK/pins.txt" -e .
  cp "$WORK/pins.txt" "$MIN_VENV/pins.txt"
fi
"$PY" -m pip check
"$PY" - "$WORK/pins.txt" <<'EOF'
import sys
from importlib.metadata import version
from pip._vendor.packaging.requirements import Requirement
for line in open(sys.argv[1]):
    req = Requirement(line.strip())
    if req.marker is None or req.marker.evaluate():
        installed = version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is not {req}"
        print(f"  {req.name}=={installed}")
EOF

echo "== lower bounds: unit tests"
"$PY" -m pytest -q -p no:cacheprovider -m "not slow" -rfE --tb=short "${TESTS[@]}"

echo "== lower bounds: both shipped toys, scores against $REFERENCE_PY"
"$PY" - "$WORK/captions.txt" <<'EOF'
import json, sys
from pathlib import Path
from auditor.toy.shipped import shipped_model_dir
manifest = json.loads((shipped_model_dir() / "toy_manifest.json").read_text())
captions = [row["caption"] if isinstance(row, dict) else row for row in manifest["memorized"] + manifest["held_out"]]
Path(sys.argv[1]).write_text("\n".join(captions) + "\n")
EOF
for family in sd sd3; do
  for side in min reference; do
    python=$PY; [ "$side" = reference ] && python=$REFERENCE_PY
    model=$("$python" -m auditor toy-model path --family "$family")
    "$python" -m auditor score --json --model "$model" --file "$WORK/captions.txt" >"$WORK/$family-$side.jsonl"
  done
done
"$PY" - "$WORK" <<'EOF'
import json, math, sys
from pathlib import Path
work = Path(sys.argv[1])
for family in ("sd", "sd3"):
    rows = {side: [json.loads(line) for line in (work / f"{family}-{side}.jsonl").open()] for side in ("min", "reference")}
    assert len(rows["min"]) == len(rows["reference"]) == 340, {side: len(r) for side, r in rows.items()}
    worst = max(abs(a["score"] - b["score"]) / max(abs(b["score"]), 1e-6) for a, b in zip(rows["min"], rows["reference"]))
    assert all(a["caption"] == b["caption"] and a["n_tokens"] == b["n_tokens"] for a, b in zip(*rows.values()))
    assert math.isfinite(worst) and worst <= 1e-4, f"{family}: scores differ from the reference venv's by {worst:.2e} (relative)"
    print(f"  {family}: 340 scores match the reference venv's (largest relative difference {worst:.1e})")
EOF

echo "== lower bounds: one audit on local Ray"
"$PY" -m auditor audit "$WORK/captions.txt" "$WORK/audit" --model "$("$PY" -m auditor toy-model path)" \
  >"$WORK/audit.log" 2>&1 || { tail -n 40 "$WORK/audit.log"; exit 1; }
tail -n 2 "$WORK/audit.log"
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
work = Path(sys.argv[1])
table = pq.read_table(work / "audit" / "scores")
audited = dict(zip(table.column("caption").to_pylist(), table.column("score").to_pylist()))
scored = {row["caption"]: row["score"] for row in map(json.loads, (work / "sd-min.jsonl").open())}
assert table.num_rows == len(scored) == 340, (table.num_rows, len(scored))
worst = max(abs(audited[c] - s) / max(abs(s), 1e-6) for c, s in scored.items())
assert worst <= 1e-4, f"the audit's scores differ from auditor score's by {worst:.2e} (relative)"
print(f"  audit: 340 rows, scores equal auditor score's (largest relative difference {worst:.1e})")
EOF
echo "== lower bounds: passed in $((SECONDS - started)) s"
