#!/usr/bin/env bash
# Install check: does `pip install auditor` resolve quickly in the environment users have?
#
# GPU images ship torch, so this builds a fresh venv, installs $TORCH first, then installs the project with nothing
# pinned (what a user's pip does, no constraints.txt) under a time limit: a dependency that makes pip's resolver
# backtrack (boto3 beside s3fs did: not resolved after 9.5 min) fails CI here instead of a user's image build.
# Then one `auditor score` of the shipped toy with those newest versions. Measured on a 2-core EPYC, 2026-12-07,
# another engineer's tests on the cores: `pip install .` 70 s, the whole check 129 s. Run alone: .ci/install_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=${TORCH:-torch==2.13.0}
INSTALL_LIMIT_S=${INSTALL_LIMIT_S:-300}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== install check: $TORCH first, then pip install . within $INSTALL_LIMIT_S s"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --upgrade pip
"$WORK/venv/bin/python" -m pip install -q "$TORCH"
started=$SECONDS
if ! timeout "$INSTALL_LIMIT_S" "$WORK/venv/bin/python" -m pip install -q . >"$WORK/install.log" 2>&1; then
  tail -n 20 "$WORK/install.log"
  echo "install check: 'pip install .' beside $TORCH did not finish in $INSTALL_LIMIT_S s (or failed): a requirement" \
    "makes pip backtrack; find it in the log above ('pip is looking at multiple versions of ...')"
  exit 1
fi
echo "  resolved and installed in $((SECONDS - started)) s"
"$WORK/venv/bin/python" -m pip check
cd "$WORK"  # the installed package, not the checkout
HF_HUB_OFFLINE=1 "$WORK/venv/bin/auditor" score --model "$("$WORK/venv/bin/auditor" toy-model path)" \
  "a photo of a cat" >/dev/null
echo "== install check: passed ($("$WORK/venv/bin/python" -c 'import ray, transformers, diffusers; print("ray", ray.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__)'))"
