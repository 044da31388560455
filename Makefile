# splatface — every target creates .venv with the pinned dependencies first (once).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second environment with Blender 4.5 LTS as a module, for the add-on's tests that
# differ between 4.5 and 5.0 (tests/test_blender_compat.py; the service they talk to runs
# from .venv). The stamp names the pin, so changing BPY45 reinstalls.
BPY45 := 4.5.15
VENV45 := .venv-bpy45
STAMP45 := $(VENV45)/.installed-bpy$(BPY45)

.PHONY: demo test bench addon lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(STAMP45):
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11) on PATH, or make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(VENV45)/bin/python || $(PYTHON) -m venv $(VENV45)
	echo '*' > $(VENV45)/.gitignore
	$(VENV45)/bin/python -m pip install --quiet --upgrade pip
	$(VENV45)/bin/python -m pip install --quiet 'bpy==$(BPY45)' 'numpy>=1.24,<2' 'pyzmq>=25' \
		'msgpack>=1.0' 'pytest>=8' 'pytest-timeout>=2.3' 'plyfile>=1.0'
	rm -f $(VENV45)/.installed-bpy*
	touch $(STAMP45)

demo: $(STAMP)
	$(VENV)/bin/splatface demo --out out/demo

test: $(STAMP) $(STAMP45)
	$(PY) -m ruff check .
	SPLATFACE_BPY45_PYTHON=$(VENV45)/bin/python $(PY) -m pytest

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
	rm -rf $(VENV) $(VENV45) out dist .pytest_cache
