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

# What the demo adds to the default recipe (README, "The default run"): torch.compile where the C++
# compiler Inductor builds CPU code with is installed, and bf16 autocast on a CPU with AMX matrix
# units and no GPU (a GPU takes bf16 by itself). Read after the install, when the demo runs.
DEMO_OVERRIDES = $$($(BIN)/python -c "import shutil, torch; from hasten.train.build import cpu_compiler; \
	print('train.compile=true' * bool(shutil.which(cpu_compiler())), \
	      'precision.dtype=bf16' * (not torch.cuda.is_available() and getattr(torch.cpu, '_is_amx_tile_supported', bool)()))")

demo: $(STAMP)
	$(BIN)/hasten train $(DEMO_OVERRIDES)
	$(BIN)/hasten generate runs/default --prompt "def " --tokens 120
	@echo "run folder: runs/default (loss.png, metrics.jsonl, summary.json, checkpoints/)"
	@echo "next: '$(BIN)/hasten bench' measures every method side by side (about 7 minutes here) into runs/bench/report.html"

test: $(STAMP)  # two workers (pytest-xdist): compilation, most of the suite's time, runs on both cores
	$(BIN)/python -m pytest tests -n 2 --dist worksteal --durations=15

clean:
	rm -rf $(VENV) runs
