# The two commands of the README:
#   make book   set everything up and build the book into _build/html
#   make test   set everything up and run every test
# Everything is installed into .venv from constraints.txt (the tested versions).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MATHJAX_DIR := .cache/mathjax/node_modules/mathjax
JB_FLAGS := -W -n --keep-going

.PHONY: book test setup unit baseline colab notebooks-check build-check browser exercises exercises-after-nbval notebooks bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

book: setup
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	@echo "Open _build/html/index.html in a browser."

# Every test: unit tests, notebooks (nbval), the book build, the browser check of
# the built site, and the instructors' exercise build.
test: setup
	$(BIN)/python scripts/run_steps.py unit baseline colab notebooks-check build-check browser exercises-after-nbval
	@echo "All tests passed."

unit: setup
	$(BIN)/python -m pytest tests --ignore=tests/site --ignore=tests/test_colab.py -q

# The studies' committed records checked against the code: the small pre-trained
# baseline the chapters load (a little over a minute on a CPU, cached in
# ~/.cache/tutorial_lib or $$TUTORIAL_LIB_CACHE, never committed) is built and compared
# whole; every other study re-computes a fixed sample of its record (chapter 3's, its
# disentangled variant).
baseline: setup
	$(BIN)/python -m tutorial_lib.studies --check

# Lab 5 and chapter 8 on a stand-in for a fresh Colab runtime, each installed by its own
# install cell from a local git repository of the working tree, and lab 5 graded by
# Otter in its autograder's environment (tests/test_colab.py). After `baseline`: chapter
# 8 loads the CPU baseline, which that step leaves in the cache.
colab: setup
	$(BIN)/python -m pytest tests/test_colab.py -q

notebooks-check: setup
	@if ls chapters/*.ipynb labs/*.ipynb >/dev/null 2>&1; then \
		$(BIN)/python -m pytest --nbval chapters labs --nbval-sanitize-with tests/nbval_sanitize.cfg -q; \
	else echo "nbval: no chapter or lab notebooks yet"; fi

build-check: setup
	rm -rf _build
	$(BIN)/jupyter-book build . $(JB_FLAGS)

browser: setup $(MATHJAX_DIR)
	@test -x /usr/bin/chromium || (echo "Installing Chromium (needs root)"; \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	MATHJAX_DIR=$(MATHJAX_DIR) $(BIN)/python -m pytest tests/site -q

$(MATHJAX_DIR):
	npm install --silent --no-audit --no-fund --prefix .cache/mathjax mathjax@3

# Also writes the student versions into exercises/, which the site shows: commit them.
exercises: setup
	$(BIN)/python scripts/build_exercises.py

# In make test the labs, solutions and tests, have just run once under nbval
# (notebooks-check), so Otter only generates the student and autograder versions;
# --check fails if a committed student version in exercises/ is not the fresh one.
exercises-after-nbval: setup
	$(BIN)/python scripts/build_exercises.py --solutions-tested-by-nbval --check

# Re-execute every notebook in place (after changing the library or a notebook).
notebooks: setup baseline
	$(BIN)/python scripts/execute_notebooks.py

bench: setup
	$(BIN)/python benchmarks/bench_encoder.py

clean:
	rm -rf _build dist .cache
