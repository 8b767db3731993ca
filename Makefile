# The two commands a new machine needs: `make demo` and `make test`.
# Both create .venv and install hasten into it. An existing torch is kept; on a machine without a
# GPU the CPU build of torch is installed first, so that pip never pulls a multi-GB CUDA build.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q torch; \
	else \
		$(BIN)/python -m pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The demo compiles the model (torch.compile) where the C++ compiler that Inductor uses on the CPU is
# installed: on a 2-core CPU its steps run ~30 % faster than eager ones, after a ~20 s compile.
DEMO_COMPILE = $(shell command -v $${CXX:-g++} >/dev/null 2>&1 && echo train.compile=true)

demo: $(STAMP)
	$(BIN)/hasten train $(DEMO_COMPILE)
	$(BIN)/hasten generate runs/default --prompt "def " --tokens 120
	@echo "run folder: runs/default (loss.png, metrics.jsonl, summary.json, checkpoints/)"
	@echo "next: '$(BIN)/hasten bench' measures every method side by side (about 7 minutes here) into runs/bench/report.html"

test: $(STAMP)  # two workers (pytest-xdist): compilation, most of the suite's time, runs on both cores
	$(BIN)/python -m pytest tests -n 2 --dist worksteal --durations=15

clean:
	rm -rf $(VENV) runs
