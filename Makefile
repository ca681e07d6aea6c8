# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/miles pretrain

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=20 -n auto --maxprocesses=4 tests

# The bench extra adds decord: the peers' loader, which the data-loading benchmark compares with.
$(VENV)/.bench-installed: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/miles bench --suite all

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs data/smoke
