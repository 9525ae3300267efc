# `make demo` and `make test` are all a fresh clone needs: both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HEFT := $(VENV)/bin/heft
STAMP := $(VENV)/.heft-installed
DEMO_DATA ?= demo_data

.PHONY: install demo test test-quick clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import importlib.util as u, sys, torch, heft.launcher.cli; sys.exit(any(u.find_spec(m) is None for m in ('megatron.core', 'streaming')))" || (echo "heft: install failed" >&2; exit 1)
	@touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA)/manifest.json: $(STAMP)
	$(HEFT) prepare --demo $(DEMO_DATA)

# DEMO_ARGS: extra key=value overrides (CI shortens the run with train.steps=...).
demo: $(DEMO_DATA)/manifest.json
	$(HEFT) train configs/demo.yaml data.path=$(DEMO_DATA) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The inner loop (under 5 minutes): unit tests and one real two-rank `heft train`. `make test` runs all.
test-quick: $(STAMP)
	$(PY) -m pytest tests -m quick $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DATA) runs
