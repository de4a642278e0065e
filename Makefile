# Two commands a user needs: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.uvc-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: demo test bench bench-quick data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package; needs root (or install it yourself / pass --data-root).
data:
	@test -f $(FMNIST) || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; exit 1; fi; }

demo: $(STAMP) data
	$(VENV)/bin/uvc compress --out runs/demo

# One worker per core (pytest-xdist): every test runs torch on one thread (tests/conftest.py).
test: $(STAMP) data
	$(PY) -m pytest -q -n auto

bench: $(STAMP) data
	$(PY) bench/run.py

bench-quick: $(STAMP) data
	$(PY) bench/run.py --quick

clean:
	rm -rf runs .pytest_cache
