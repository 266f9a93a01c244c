# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the releases this workplace serves from disk;
# pyproject.toml keeps open ranges (torch>=2.3) for users elsewhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean

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

bench: install
	for f in experiments/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf runs build *.egg-info .pytest_cache
