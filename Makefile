# Set-up and the main jobs in one place; see README.md.
#   make demo    install into .venv, then run RegGAN end to end on the built-in data
#   make test    install into .venv, then run the Python and C++ test suites
#   make bench   install into .venv, then print the kernel benchmark tables
# TORCH picks the torch to build against, e.g. TORCH=torch==2.14.1 for a CUDA build.
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTHON ?= python3
PY := $(VENV)/bin/python
BUILD_DIR ?= build/cmake

.PHONY: install demo test test-python test-cpp bench clean

$(VENV)/.installed: setup.py $(shell find csrc -type f)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" numpy ninja
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/reggan demo

test: test-python test-cpp

test-python: install
	$(PY) -m pytest tests

test-cpp: install
	cmake -S . -B $(BUILD_DIR) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" -Wno-dev
	cmake --build $(BUILD_DIR) -j2
	ctest --test-dir $(BUILD_DIR) --output-on-failure

bench: install
	$(PY) benchmarks/local_regression_table.py

clean:
	rm -rf $(VENV) build reggan_ext/*.so
