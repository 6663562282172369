# Two commands do all the set-up: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# stamps: the full (test) install, and what `make train` needs
STAMP := $(VENV)/.installed-stamp
RUN_STAMP := $(VENV)/.installed-photos

.PHONY: train test test-fast lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# `make train` needs the package and the photos extra alone (no TensorFlow, no test tools).
$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[photos]'
	touch $@

# `make test` needs everything: the tfds, photos and dev extras (TensorFlow included).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $@ $(RUN_STAMP)

## Train a small tokenizer on the embedded sample photos (offline), then reconstruct.
train: $(RUN_STAMP)
	$(PY) train.py --config configs/default.py --workdir workdir/default
	$(PY) sample.py --workdir workdir/default --out workdir/default/recon.png

## Lint, format check and the whole test suite.
test: $(STAMP) lint
	$(PY) -m pytest -q

## Lint and every test but script launches, multi-process runs, notebooks and benchmarks.
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache workdir
