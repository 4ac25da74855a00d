# auditor: `make help` lists the targets. Everything runs from the project's own virtualenv (.venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# This workplace ships a CPU torch 2.13.0 wheel on disk; on a CUDA machine take the newest matching build.
# Override: make install TORCH="torch==2.5.1"
TORCH ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo "torch>=2.3"; else echo "torch==2.13.0"; fi)
# The versions CI tested (.ci/constraints.py writes it: make constraints). CONSTRAINTS= installs the newest instead.
CONSTRAINTS ?= constraints.txt
TOY_MODEL ?= .cache/toy-model
# img2dataset in a venv of its own (its pins would downgrade webdataset in .venv): the WebDataset test that runs the
# real producer against a local http.server uses it when it is there (make img2dataset), and skips saying so if not.
I2D_VENV ?= .venv-img2dataset
I2D_VERSION ?= 1.47.0
DEMO_OUT ?= runs/demo
export HF_HUB_DISABLE_PROGRESS_BARS := 1

.PHONY: help install constraints img2dataset test test-fast test-lower-bounds demo report-screenshot bench lint format toy-model gpu-wheels clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## create .venv and install auditor with test extras, at the versions of constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@touch $(VENV)/.installed
	@$(PY) -c "import auditor, torch, ray, diffusers; print('auditor installed; torch', torch.__version__, '| cuda', torch.cuda.is_available())"

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(MAKE) install

constraints: $(VENV)/.installed  ## rewrite constraints.txt from .venv (after tests passed there; README, Versions tested)
	$(PY) .ci/constraints.py test >constraints.txt
	@git diff --stat constraints.txt 2>/dev/null || true

# make test: TEST_WORKERS pytest-xdist workers. loadgroup keeps the tests of one Ray (or of the trained toy) on one
# worker; tests/conftest.py sends the single-threaded toy rebuild and the two longest groups out first. Failures are
# named as they happen, and again at the end (-rfE), with the 15 slowest tests.
TEST_WORKERS ?= 3
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder
test: $(VENV)/.installed  ## run the whole test suite (GPU tests skip without CUDA), TEST_WORKERS=3 side by side
	$(if $(wildcard $(I2D_VENV)/bin/img2dataset),IMG2DATASET=$(abspath $(I2D_VENV))/bin/img2dataset) $(PY) -m pytest -q $(PYTEST_PARALLEL) -rfE --tb=short --durations=15 tests

img2dataset:  ## img2dataset in $(I2D_VENV), for the test that writes shards with it (make test finds it there)
	@test -x $(I2D_VENV)/bin/python || python3 -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/python -m pip install -q "img2dataset==$(I2D_VERSION)"
	@$(I2D_VENV)/bin/img2dataset --help >/dev/null 2>&1 && echo "img2dataset $(I2D_VERSION) in $(I2D_VENV)"

test-fast: $(VENV)/.installed  ## unit tests only (no Ray, no S3 server)
	$(PY) -m pytest -q -rfE --tb=short tests/unit

test-lower-bounds: $(VENV)/.installed  ## every dependency at its declared minimum (.venv-min): unit tests, both toys, one audit
	.ci/lower_bounds.sh

demo: $(VENV)/.installed  ## shipped toy model: sample corpus, calibrate, audit on local Ray, top flags, HTML report
	$(PY) -m auditor.toy.demo --out $(DEMO_OUT)

REPORT ?= $(DEMO_OUT)/audit/report.html
report-screenshot:  ## screenshot the demo's report.html into docs/report.png (headless chromium; REPORT=file for another)
	@test -f $(REPORT) || { echo "no $(REPORT): run make demo first, or pass REPORT=path/to/report.html"; exit 1; }
	@command -v chromium >/dev/null || { echo "needs Debian's chromium: apt-get install -y chromium"; exit 1; }
	@mkdir -p docs
	@rm -f docs/report.png
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$$(mktemp -d)" \
	    --window-size=1280,3300 --screenshot="$(CURDIR)/docs/report.png" "file://$(abspath $(REPORT))" 2>/dev/null
	@test -s docs/report.png && echo "docs/report.png <- $(REPORT)"

toy-model: $(VENV)/.installed  ## build (or reuse) the toy memorizing model in $(TOY_MODEL)
	$(PY) -m auditor toy-model build $(TOY_MODEL)

bench: $(VENV)/.installed  ## CPU benchmarks (run on an otherwise idle machine); results go to BENCHMARKS.md by hand
	$(PY) bench/scorer.py

gpu-wheels: $(VENV)/.installed  ## wheels bench/gpu.sh installs on an offline GPU machine (carry .cache/wheels)
	$(PY) -m pip download -q --no-deps -d .cache/wheels "diffusers==$$($(PY) -c 'import diffusers; print(diffusers.__version__)')" importlib_metadata zipp

lint: $(VENV)/.installed  ## ruff format check + lint
	$(PY) -m ruff format --check auditor jobs bench tests examples
	$(PY) -m ruff check auditor jobs bench tests examples

format: $(VENV)/.installed  ## apply ruff formatting and fixes
	$(PY) -m ruff format auditor jobs bench tests examples
	$(PY) -m ruff check --fix auditor jobs bench tests examples

clean:  ## remove caches and demo outputs (keeps .venv)
	rm -rf .cache runs .pytest_cache .ruff_cache
