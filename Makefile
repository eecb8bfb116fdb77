# Each target installs what it needs into .venv first, so a fresh clone needs
# one command. The venv sees the system's site-packages, so a torch (and
# triton) that is already installed there is kept; otherwise torch==2.13.0,
# the CPU build, is installed.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# No folder of the checkout may shadow an installed package (kernels/ would hide Hugging
# Face's `kernels`, which transformers imports): with PYTHONSAFEPATH (Python 3.11+) no
# `python -m` or `-c` puts the working directory on sys.path; pytest adds only tests/.
export PYTHONSAFEPATH := 1

.PHONY: install test package-check fuzz bench lint gpu-check codegen tune clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "make needs Python 3.11+ (PYTHONSAFEPATH); pip install works on 3.10"; exit 1; }
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

# Without CUDA the Triton kernels run in the interpreter (tests/conftest.py
# sets TRITON_INTERPRET=1 when no GPU is present).
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The package as pip users get it (CI runs this after make test): the wheel, installed with
# its hf and plot extras into a clean venv outside the checkout, its commands run from an
# empty folder: --help, an estimate, the Hugging Face integration's import, and both
# benchmarks at their smallest shapes (--smoke), which must write their results. Then the
# sdist, unpacked elsewhere: its own `make test` collects every test.
DIST_DIR := build/dist
package-check: install
	rm -rf $(DIST_DIR)
	$(PY) -m pip install -q build
	$(PY) -m build -q --no-isolation --sdist --wheel -o $(DIST_DIR) .
	wheel=$$(realpath $(DIST_DIR)/ckpt_attn-*.whl); dir=$$(mktemp -d); \
	trap 'rm -rf "$$dir"' EXIT; cd "$$dir"; \
	python3 -m venv venv; \
	venv/bin/python -m pip install -q torch==2.13.0; \
	venv/bin/python -m pip install -q "$$wheel[hf,plot]"; \
	venv/bin/ckpt-attn --help; \
	venv/bin/ckpt-attn estimate --preset llama-7b --seq 4096; \
	venv/bin/python -c "import ckpt_attn.integrations.transformers, kernels; \
		print('ckpt_attn.integrations.transformers imports; kernels is', kernels.__file__)"; \
	venv/bin/python -c "import importlib.util as u; \
		print('triton installed:', u.find_spec('triton') is not None)"; \
	venv/bin/ckpt-attn bench --smoke --out results; \
	ls results; test -s results/cpu_results.md && test -s results/policies.md
	sdist=$$(realpath $(DIST_DIR)/ckpt_attn-*.tar.gz); dir=$$(mktemp -d); \
	trap 'rm -rf "$$dir"' EXIT; tar xzf "$$sdist" -C "$$dir"; \
	$(MAKE) --no-print-directory -C "$$dir"/ckpt_attn-* test PYTEST_ARGS="--collect-only" \
		| grep -E "tests? collected"

# The property tests of tests/test_fuzz.py with FUZZ_EXAMPLES problems each (make test
# draws a few dozen): per backend, that many problems against the float64 reference.
# About 20 minutes on 2 CPU cores (the Triton kernels in the interpreter).
FUZZ_EXAMPLES ?= 1000
fuzz: install
	CKPT_ATTN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q --hypothesis-show-statistics \
		tests/test_fuzz.py $(PYTEST_ARGS)

# The attention op, then the checkpoint policies' trade-off (policies.md, .csv, .png; about
# 20 CPU-minutes on the CPU, most of it seven inductor compiles). Results go to a fresh
# folder, results/<date-time>/ (not tracked); BENCH_OUT=benchmarks/results refreshes the
# committed ones.
BENCH_OUT ?= results/$(shell date +%Y%m%d-%H%M%S)
bench: install
	$(VENV)/bin/ckpt-attn bench --out $(BENCH_OUT)

lint: install
	$(PY) -m pip install -q "ruff>=0.5"
	$(PY) -m ruff check .

# What ptxas makes of every kernel, compiled for sm_90a and sm_80 exactly as a
# launch specializes it (no GPU needed): benchmarks/results/sm90_codegen.md.
codegen: install
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m ckpt_attn.benchmarks.codegen --out benchmarks/results

# On a CUDA machine: time the launch table's candidates and write the fastest to
# kernels/tuned/sm_<arch>.json, which the launcher then tries first.
tune: install
	$(PY) -m ckpt_attn.benchmarks.tune

# On a CUDA machine: the GPU tests, then a short benchmark of the op and the
# policies, and a 2-rank context-parallel check when 2+ GPUs are visible (run even if a test
# fails), results under benchmarks/results/; fails if a test failed. Under 8
# minutes on one H100/H200. Needs no network where torch, triton, pytest,
# einops and hypothesis are installed.
gpu-check: install
	mkdir -p benchmarks/results
	status=0; \
	$(PY) -m pytest -q -m gpu tests 2>&1 | tee benchmarks/results/gpu-tests.txt || status=$$?; \
	$(VENV)/bin/ckpt-attn bench --quick --only attention --out benchmarks/results; \
	$(VENV)/bin/ckpt-attn bench --quick --only policies --out benchmarks/results/gpu-policies; \
	if [ "$$($(PY) -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then \
		$(PY) -m torch.distributed.run --nproc-per-node 2 -m ckpt_attn.distributed.selfcheck \
			| tee benchmarks/results/gpu-context-parallel.txt || status=$$?; \
	fi; \
	echo "ptxas's report of the kernels just timed (sm_90a, bf16; see sm90_codegen.md):"; \
	TRITON_DEFAULT_FP_FUSION=1 $(PY) -m ckpt_attn.benchmarks.codegen --arch 90 --dtype bf16 \
		--head-dim 64 128 --out benchmarks/results/gpu-codegen; \
	exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
