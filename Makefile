# Everything a fresh machine needs: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch; pyproject keeps a range that this pin satisfies, so pip never
# replaces it with a multi-GB CUDA build. Override on other machines: make TORCH=torch==2.5.1
TORCH  ?= torch==2.13.0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test test-fast bench bench-gpu data browser lint clean docs

# what `make demo` needs: torch and falkit's own dependencies
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

# what the tests need besides: pytest, ruff, Flower, the labeling page, selenium, pandas,
# transformers (the extras dev and fm), and the example plug-in (examples/plugin)
$(VENV)/.installed: $(VENV)/.base examples/plugin/pyproject.toml
	$(PY) -m pip install -q -e '.[dev,fm]'
	$(PY) -m pip install -q -e examples/plugin  # the example plug-in: its tests run too
	touch $@

# Fashion-MNIST: any data root falkit searches will do; on Debian/Ubuntu the package
# dataset-fashion-mnist provides it offline, elsewhere `falkit data download fmnist`.
data: $(VENV)/.base
	@if $(VENV)/bin/falkit data find fmnist >/dev/null 2>&1; then \
	  echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }; \
	else \
	  $(VENV)/bin/falkit data download fmnist; \
	fi
	@$(VENV)/bin/falkit data find fmnist

demo: data
	$(VENV)/bin/falkit demo

# the labeling page's browser test drives Debian's chromium through its chromedriver
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "chromium: found"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium: installing Debian packages chromium chromium-driver"; \
	  $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }; \
	else \
	  echo "chromium: not found and no apt-get; the browser test will be skipped"; \
	fi

# Label Studio's own SDK validates falkit's exported config and tasks and converts an export
# to JSON_MIN (tests/test_label_studio_sdk.py), in a venv of its own: it pins numpy and
# opencv differently from falkit's. If it cannot install, that test says so and is skipped.
LS_VENV := $(VENV)/label-studio
$(LS_VENV)/.installed:
	@$(PYTHON) -m venv $(LS_VENV) && $(LS_VENV)/bin/python -m pip install -q \
	  "label-studio-sdk==2.1.2" && touch $@ || \
	  echo "label-studio-sdk did not install: its round-trip test will be skipped"

# the documentation site into site/ (open site/index.html); make test builds it too
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

test: data browser $(VENV)/.installed $(LS_VENV)/.installed
	$(PY) -m pytest -q

# Speed as measured facts (issue 4): ~40 min here; writes benchmarks/RESULTS.md.
# BENCH_ARGS="--only engine,query --reps 3" runs a part (other sections keep their results).
bench: data $(VENV)/.installed
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# The GPU check (issue 14): every strategy, FL algorithm and FAST for two quick cycles on
# CUDA, then the paper protocol timed; < 10 min on one H100; writes benchmarks/GPU_RESULTS.md.
# Needs no venv and no install: any python with a CUDA build of torch (GPU_PYTHON), numpy,
# scipy and scikit-learn, and Fashion-MNIST ($$FALKIT_DATA). GPU_ARGS="--cpu-too" etc.
GPU_PYTHON ?= python3
bench-gpu:
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu.py $(GPU_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs
