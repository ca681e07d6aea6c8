# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing and
# install through requirements.lock, the versions the whole suite last passed with (`make lock` renews it).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
LOCK_VENV := .venv-lock
# The suite, as CI runs it: one xdist worker per core (at most 4).
PYTEST_SUITE := -m pytest -q --durations=20 -n auto --maxprocesses=4 tests

.PHONY: install demo test bench lint lock clean

# pip and setuptools come from the lock first, so that the editable build (no build isolation) uses the
# locked setuptools too; every other package is held to its locked version by -c.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) pip setuptools
	$(PY) -m pip install --quiet --no-build-isolation -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/miles pretrain

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) $(PYTEST_SUITE)

# The bench extra adds decord: the peers' loader, which the data-loading benchmark compares with.
$(VENV)/.bench-installed: $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation -c $(LOCK) -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/miles bench --suite all

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Upgrade on purpose: resolve the newest versions that pyproject.toml allows in a scratch venv, run the
# whole suite there, and rewrite the lock only if it passes. `git diff requirements.lock` shows what moved.
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-build-isolation -e '.[dev,bench]'
	HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/python $(PYTEST_SUITE)
	{ echo "# The tested versions: every package that 'make install' (and 'make bench') brings, pinned."; \
	  echo "# Written by 'make lock' on $$(date -u +%F), after the whole suite passed with exactly these"; \
	  echo "# versions in a fresh venv ($$($(LOCK_VENV)/bin/python -c 'import platform as p; print(f"Python {p.python_version()}, {p.system()} {p.machine()}")'))."; \
	  echo "# Used as pip constraints: pip install -c $(LOCK) -e '.[dev]'. Edit by running 'make lock', not by hand."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "$(LOCK) rewritten; the suite passed with it. What moved: git diff $(LOCK)"

clean:
	rm -rf runs data/smoke
