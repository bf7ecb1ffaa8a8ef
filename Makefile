# Everything sets itself up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Offline data copies (XCOPA, MGSM, xSID, NTREX/NusaX/MAFAND, language table) live beside the checkout.
AETHERIS_DATA_DIR ?= $(abspath ../shared/data)
export AETHERIS_DATA_DIR
# Quiet, offline-safe defaults for the hub libraries; real runs override these in the shell.
export HF_HUB_DISABLE_TELEMETRY = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: help install demo demo-quick results test test-slow bench bench-real bench-fullwidth image image-cuda clean

help:
	@echo "make demo       # set up, then run the embedded CPU demo (FORCE=1 redoes finished steps)"
	@echo "make demo-quick # the same pipeline cut short (~3 min): a smoke run, not a result"
	@echo "make results    # make demo, then write docs/RESULTS.md from its report"
	@echo "make test       # set up, then run the test suite (fast tier)"
	@echo "make test-slow  # the slow tier (tests marked slow)"
	@echo "make bench      # quick benchmarks -> bench-results/*.json (< 5 min)"
	@echo "make bench-real # Tiny Aya's real shapes: decode, prefill, training, KD step (~16 GB, minutes)"
	@echo "make bench-fullwidth # Tiny Aya's real widths end to end on CPU (~20 GB RAM, ~30 min) -> bench-results/fullwidth.json"
	@echo "make image      # CPU container image aetheris:cpu (docker or podman; IMAGE_FLAGS=... for build options)"
	@echo "make image-cuda # CUDA container image aetheris:cuda (CUDA torch + fused kernels)"

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

DEMO_FLAGS := $(if $(filter-out 0,$(FORCE)),--force)

demo: install
	$(PY) -m aetheris.demo --config configs/demo.yaml $(DEMO_FLAGS)

demo-quick: install
	$(PY) -m aetheris.demo --config configs/demo-quick.yaml $(DEMO_FLAGS)

results: install
	$(PY) -m aetheris.demo --config configs/demo.yaml $(DEMO_FLAGS) --write-docs docs

# Exit status 5 means "no tests collected" (e.g. every test of a tier deselected): not a failure.
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --timeout 600 || [ $$? -eq 5 ]

# The tests marked slow (> ~30 s each on 2 cores: the demo run, the full pipeline, torchrun, the
# lm-evaluation-harness equivalences); `make test` leaves them out.
test-slow: install
	$(PY) -m pytest -q -m slow -n 2 --dist loadgroup --timeout 1800 || [ $$? -eq 5 ]

bench: install
	mkdir -p bench-results
	$(PY) benchmarks/scan.py --quick --json bench-results/scan.json
	$(PY) benchmarks/moe.py --quick --json bench-results/moe.json
	$(PY) benchmarks/decode.py --quick --json bench-results/decode.json
	$(PY) benchmarks/decode.py --real-shapes --quick --decode-layouts compiled,packed,packed-head --json bench-results/decode-real-quick.json
	$(PY) benchmarks/throughput.py --quick --json bench-results/throughput-quick.json

# Real shapes: bf16 Tiny Aya (6.7 GB) and its student (7.9 GB) in one process, plus caches; points that do
# not fit the free memory are skipped with the reason.
bench-real: install
	mkdir -p bench-results
	$(PY) benchmarks/decode.py --real-shapes --decode-layouts compiled,packed,packed-head --json bench-results/decode-real.json
	$(PY) benchmarks/throughput.py --json bench-results/throughput-real.json

bench-fullwidth: install
	mkdir -p bench-results
	$(PY) benchmarks/fullwidth.py --json bench-results/fullwidth.json

# Container images. ENGINE: docker when its daemon answers, else podman. IMAGE_FLAGS: extra build
# options, e.g. --build-arg BASE=..., --secret id=pip.conf,src=..., --build-context wheels=DIR
# (docs/SERVING.md shows a build without registry access).
ENGINE      ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGE       ?= aetheris
IMAGE_FLAGS ?=

image:
	$(ENGINE) build $(IMAGE_FLAGS) -f Dockerfile -t $(IMAGE):cpu .

image-cuda:
	$(ENGINE) build $(IMAGE_FLAGS) -f Dockerfile.cuda -t $(IMAGE):cuda .

clean:
	rm -rf $(VENV) bench-results
