# make test   -- create .venv, install the pinned dependencies and run the test suite (what CI runs)
# make install -- only the .venv setup
# make bench  -- UNet forward-time benchmark of the cin256-v2 architecture (random weights)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/unet_forward.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
