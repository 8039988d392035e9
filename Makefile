# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-loaded lint imports typecheck kernels-narrow proto proto-check image image-cuda clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedprint demo

proto: $(STAMP)
	$(BIN)/python protos/generate.py

proto-check: $(STAMP)
	$(BIN)/python protos/generate.py --check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The layers of DESIGN.md section 9 as import contracts ([tool.importlinter] in pyproject.toml).
imports: $(STAMP)
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint imports typecheck
	$(BIN)/pytest -q

# The suite as a busy machine runs it: two CPU-bound processes hold both cores throughout and end
# with it, however it ends (pass, fail, interrupt). A test that passes only on a quiet machine
# fails here first.
test-loaded: $(STAMP)
	@pids=''; trap 'kill $$pids 2>/dev/null || true' EXIT; trap 'exit 130' INT TERM; \
	for core in 1 2; do $(BIN)/python -c 'while True: pass' & pids="$$pids $$!"; done; \
	$(BIN)/pytest -q; status=$$?; kill $$pids 2>/dev/null || true; exit $$status

# The floating-point kernel tests once more on narrower vector units than this CPU may have
# (AVX2, then none), so a test that holds only with AVX-512 fails here rather than on the next
# machine. ONEDNN_MAX_CPU_ISA caps the matrix products, ATEN_CPU_CAPABILITY the other kernels.
kernels-narrow: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/pytest -q -m kernels
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/pytest -q -m kernels

# Container images (need a container engine, which these machines lack; see helm/README.md).
# The tag follows the version in pyproject.toml, which is the Helm chart's appVersion.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DOCKER ?= docker

image:
	$(DOCKER) build -f Dockerfile -t fedprint:$(VERSION) .

image-cuda:
	$(DOCKER) build -f Dockerfile.cuda -t fedprint-cuda:$(VERSION) .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
