# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing and
# install through requirements.lock, the versions the whole suite last passed with (`make lock` renews it).
#
# XFORMERS=1 (any target): the xformers profile, in its own .venv-xformers, through
# requirements-xformers.lock. xformers 0.0.35's CUDA kernels load only with the torch its wheel was built
# for (2.10, CUDA 12.8), so this profile pairs them; everything else is the default lock's.
# `make lock-xformers` renews that lock.
XFORMERS ?= 0
XFORMERS_PINS := torch==2.10.0 torchvision==0.25.0 xformers==0.0.35
ifeq ($(XFORMERS),1)
VENV ?= .venv-xformers
LOCK := requirements-xformers.lock
else
VENV ?= .venv
LOCK := requirements.lock
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK_VENV := .venv-lock
# The suite, as CI runs it: one xdist worker per core (at most 4).
PYTEST_SUITE := -m pytest -q --durations=20 -n auto --maxprocesses=4 tests

.PHONY: install demo test bench lint lock lock-xformers clean

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

# The xformers profile's lock: the default lock without its torch stack (torch, torchvision, triton and
# their CUDA 13 libraries), plus XFORMERS_PINS; the whole suite must pass before it is written.
TORCH_STACK := ^(torch|torchvision|triton|xformers|cuda-bindings|cuda-toolkit|nvidia-(cublas|cuda-[a-z]+|cudnn-cu13|cufft|cufile|curand|cusolver|cusparse|cusparselt-cu13|nccl-cu13|nvjitlink|nvshmem-cu13|nvtx))==
lock-xformers:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	grep -v -E '$(TORCH_STACK)' requirements.lock > $(LOCK_VENV)/base.txt
	printf '%s\n' $(XFORMERS_PINS) > $(LOCK_VENV)/pins.txt
	$(LOCK_VENV)/bin/python -m pip install --quiet -c $(LOCK_VENV)/base.txt pip setuptools
	$(LOCK_VENV)/bin/python -m pip install --quiet --no-build-isolation -c $(LOCK_VENV)/base.txt \
	    -c $(LOCK_VENV)/pins.txt -e '.[dev,bench]'
	cp requirements-xformers.lock $(LOCK_VENV)/previous.lock 2>/dev/null || true
	{ echo "# The xformers profile (make ... XFORMERS=1): requirements.lock with the torch that xformers' wheel"; \
	  echo "# was built for. Written by 'make lock-xformers' on $$(date -u +%F), after the whole suite passed"; \
	  echo "# with exactly these versions in a fresh venv ($$($(LOCK_VENV)/bin/python -c 'import platform as p; print(f"Python {p.python_version()}, {p.system()} {p.machine()}")'))."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable; } > requirements-xformers.lock
	# The suite checks the candidate lock itself (tests/test_install_profiles.py); on failure the old one returns.
	HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/python $(PYTEST_SUITE) || \
	    { if [ -f $(LOCK_VENV)/previous.lock ]; then cp $(LOCK_VENV)/previous.lock requirements-xformers.lock; \
	      else rm -f requirements-xformers.lock; fi; exit 1; }
	rm -rf $(LOCK_VENV)
	@echo "requirements-xformers.lock rewritten; the suite passed with it"

clean:
	rm -rf runs data/smoke
