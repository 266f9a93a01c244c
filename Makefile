# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the releases this workplace serves from disk;
# pyproject.toml keeps open ranges (torch>=2.3) for users elsewhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench bench-peers experiments mutate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m modeconn.demo --out runs/demo

test: install
	$(PY) -m pytest -q

# Mutation testing over the core modules ([tool.mutmut] in pyproject.toml; tests/MUTATION.md).
# MUTANTS narrows the run to mutant names (globs), e.g. make mutate MUTANTS='modeconn.core.curves.*'.
# PYTHONPATH is cleared so the tests import the mutated copy in mutants/, not a checkout.
MUTANTS ?=
MUTMUT_CHILDREN ?= 2

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

mutate: $(VENV)/.installed-dev
	env -u PYTHONPATH OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTMUT_CHILDREN) $(MUTANTS)
	env -u PYTHONPATH $(VENV)/bin/mutmut results

bench: install
	for f in benchmarks/[a-z]*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# modeconn against the peers' own code (benchmarks/peers.py): installs them (benchmark-only, never
# dependencies of the package) into $(VENV) first; `make bench` prints a row per peer it cannot import
bench-peers: install
	$(PY) -m pip install --quiet -r benchmarks/requirements-peers.txt
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/peers.py

# The papers' results on the CPU (experiments/README.md): every experiment's cpu preset, one after
# another, each refreshing experiments/results/<name>.md and experiments/figures/<name>.png.
EXPERIMENTS ?= curves alignment ensembles sharp_flat skip_connections spawning simplex
experiments: install
	for e in $(EXPERIMENTS); do echo "== experiments/$$e.py"; $(PY) experiments/$$e.py --publish || exit 1; done

clean:
	rm -rf runs build *.egg-info .pytest_cache mutants
