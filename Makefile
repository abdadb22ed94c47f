# The README's two commands: `make demo` and `make test`. Each sets up .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test clean demo-model

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned, so CPU machines take the local CPU build and diffusers never pulls CUDA wheels.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,convert,video]'
	touch $@

# The embedded default model when it is in the tree (models/demo), else the tiny config's random weights.
DEMO_MODEL := $(if $(wildcard models/demo/onestory),--checkpoint models/demo,--config tiny)
demo: $(STAMP)
	rm -rf out/demo  # the demo's own output: always rendered afresh (sample.py would resume into it)
	$(PY) sample.py $(DEMO_MODEL) --story configs/stories/demo.yaml --out out/demo

# Rebuild the embedded default (docs/demo.md): VAE stage, synthetic records, DiT + memory stage.
DEMO_STORIES ?= 600
demo-model: $(STAMP)
	$(PY) train.py --config configs/train/demo-vae.yaml --workdir runs/demo-vae
	$(PY) train.py --config configs/train/demo-vae-long.yaml --workdir runs/demo-vae
	$(PY) -m onestory_jax.data.prepare --model runs/demo-vae/model --out data/demo --synthetic $(DEMO_STORIES) --frames 9
	$(PY) train.py --config configs/train/demo.yaml --workdir runs/demo train.data=data/demo/records
	mkdir -p models && rm -rf models/demo.new && cp -r runs/demo-vae/model models/demo.new && cp -r runs/demo/model/onestory models/demo.new/
	rm -rf models/demo && mv models/demo.new models/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -n 2 --dist loadfile --durations=12  # two workers (CI has 2 cores); a file's tests share one

clean:
	rm -rf $(VENV) out
