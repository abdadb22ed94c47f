# The README's two commands: `make demo` and `make test`. Each sets up .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test clean demo-model

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned, so CPU machines take the local CPU build and diffusers never pulls CUDA wheels (the pin is
# the cap of pyproject.toml's torch range; tests/test_packaging.py checks they agree). No bytecode at install
# (as uv does): Python compiles only the modules a run imports, once (the install took 114 s, 54 s without).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e '.[test,convert,video,studio]'
	touch $@

# The embedded default model when it is in the tree (models/demo), else the tiny config's random weights.
DEMO_MODEL := $(if $(wildcard models/demo/onestory),--checkpoint models/demo,--config tiny)
demo: $(STAMP)
	rm -rf out/demo  # the demo's own output: always rendered afresh (sample.py would resume into it)
	$(PY) sample.py $(DEMO_MODEL) --story configs/stories/demo.yaml --out out/demo

# Rebuild the embedded default and the memory ablation's variants (docs/demo.md), from the shipped frozen
# parts: the VAE fine-tuned toward its own image code (a frozen teacher, stage 1b), its frozen-parts folder,
# synthetic records, the shared base, the selector stage of onestory_captions, then one model per memory scheme.
# models/demo = the frozen parts + the onestory_captions variant; models/ablation/<variant>.
DEMO_STORIES ?= 800
VARIANTS := none last_frame ac_only fs_only onestory onestory_captions
FROZEN := runs/demo-frozen
demo-model: $(STAMP)
	$(PY) train.py --config configs/train/demo-vae-teacher.yaml --workdir runs/demo-vae-teacher
	rm -rf $(FROZEN) && mkdir -p $(FROZEN)
	cp -r models/demo/text_encoder models/demo/image_encoder models/demo/tokenizer runs/demo-vae-teacher/model/vae $(FROZEN)/
	$(PY) -m onestory_jax.data.prepare --model $(FROZEN) --out data/demo --synthetic $(DEMO_STORIES) --frames 9 --character-weight 0.7
	$(PY) train.py --config configs/train/demo.yaml --workdir runs/demo train.data=data/demo/records
	$(PY) train.py --config configs/train/memory-selector-captions.yaml --workdir runs/memory-selector-captions train.data=data/demo/records
	for v in $(VARIANTS); do $(PY) train.py --config configs/train/memory-$$v.yaml --workdir runs/memory-$$v train.data=data/demo/records || exit 1; done
	rm -rf models/demo.new models/ablation.new && mkdir -p models/demo.new models/ablation.new
	cp -r $(FROZEN)/* runs/memory-onestory_captions/model/onestory models/demo.new/
	for v in $(filter-out onestory_captions,$(VARIANTS)); do mkdir -p models/ablation.new/$$v && cp -r runs/memory-$$v/model/onestory models/ablation.new/$$v/; done
	mkdir -p models/ablation.new/onestory_captions && ln -s ../../demo/onestory models/ablation.new/onestory_captions/onestory
	rm -rf models/demo models/ablation && mv models/demo.new models/demo && mv models/ablation.new models/ablation

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# Two passes (tests/conftest.py): the tests on one host device, then those that need 8; both run, either fails.
	ONESTORY_TEST_DEVICES=1 $(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder -m "not multidevice" --durations=12; one=$$?; \
	$(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder -m multidevice --durations=6 && exit $$one

clean:
	rm -rf $(VENV) out
