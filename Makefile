# The README's two commands: `make demo` and `make test`. Each sets up .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned, so CPU machines take the local CPU build and diffusers never pulls CUDA wheels.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,convert,video]'
	touch $@

demo: $(STAMP)
	$(PY) sample.py --config tiny --story configs/stories/demo.yaml --out out/demo

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) out
