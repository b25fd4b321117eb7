# Every target builds its own virtual environment in .venv on first use.
#   make run   needs only the core packages (numpy, pyzmq, msgpack, psutil, tqdm);
#   make test  adds the dev tools, Ray, PyTorch (CPU is enough), matplotlib and MkDocs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BASE   := $(VENV)/.installed-base
FULL   := $(VENV)/.installed-full
# PyTorch for the torch extra: installed first, so that the extra's range is already met
# (2.13.0 is a CPU build on the project's machines; TORCH=torch takes the newest instead)
TORCH  ?= torch==2.13.0

.PHONY: run test test-fast lint docs bench clean

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(BASE)

$(FULL): $(BASE)
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[dev,ray,torch,plot,docs,tensorboard]'
	touch $(FULL)

run: $(BASE)
	$(VENV)/bin/asyncdni train

lint: $(FULL)
	$(VENV)/bin/ruff check .

# the docs site, strictly: a broken link, anchor or nav entry fails the build
docs: $(FULL)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

test: lint docs
	$(PY) -m pytest -q --durations=15

# unit tests only: no worker processes, no sockets, no subprocesses, no fuzzing or learning runs
test-fast: $(FULL)
	$(PY) -m pytest -q -m "not integration and not slow"

bench: $(FULL)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
