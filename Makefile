# efftheory: two commands for a fresh machine with Python >= 3.11 and make.
#   make demo    set up .venv and run the main job (theory vs sampled networks: table + plots in out/demo)
#   make test    set up .venv and run the default test suite (what CI runs first)
#   make physics the slow width-sweep checks against sampled networks (CI runs them as a second step)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.efftheory-installed

.PHONY: demo test physics nt bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/efftheory compare --activation tanh --critical --depth 4 --widths 16,32,64,128 --networks 500 --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

physics: $(STAMP)
	$(PY) -m pytest -q -m physics

nt:
	bash .ci/nt_env.sh .venv-nt
	.venv-nt/bin/python -m pytest -q -m nt tests/test_nt.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --small

clean:
	rm -rf out .pytest_cache
