# splatface — every target creates .venv with the pinned dependencies first (once).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench addon lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/splatface demo --out out/demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	@for b in benchmarks/[!_]*.py; do echo "# $$b"; $(PY) $$b || exit 1; done

# The extension zip (manifest at its root, protocol vendored, pyzmq/msgpack wheels for
# Linux, Windows and macOS fetched with pip download) into dist/.
addon: $(STAMP)
	$(PY) -m blender_addon.packaging --out dist

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) out dist .pytest_cache
