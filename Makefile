# The two commands a fresh machine needs:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WALDO_DATA ?= ../shared/data
DEMO_INDEX ?= demo-index
# The shipped model (waldo/pretrained/): lite0 + a trained global descriptor + the RRT that starts
# as local matching, its default chosen on validation, so the page offers every reranker over the
# better global ranking (README, "Which reranker when").
DEMO_MODEL ?= lite0-match-rrt
# Its locals are the backbone's stage-4 cells already, which local-match reads; a model with
# coarser locals (lite0-lw-rrt) stores such cells beside them with: --local-stage 4 --dim 64
DEMO_LOCAL ?=
DEMO_DATA ?= $(WALDO_DATA)/grocery_store
comma := ,
# The split filter belongs to the grocery labels.csv; any other folder is indexed whole.
DEMO_WHERE ?= $(if $(filter %/grocery_store %/grocery_store/,$(DEMO_DATA)),split=train$(comma)val$(comma)gallery)
DEMO_HOST ?= 127.0.0.1
DEMO_PORT ?= 8000
export WALDO_DATA

.PHONY: setup demo test test-fast clean-demo

# The venv is reinstalled only when pyproject.toml or this file changes. The ray extra is
# installed too, so that `make test` runs the Ray engine's tests instead of skipping them.
$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# opencv-python-headless (before TEBLID) and the contrib build both install cv2: remove both
	@# so that the contrib build installs whole.
	@if $(BIN)/python -m pip show -q opencv-python-headless >/dev/null 2>&1; then \
	  $(BIN)/python -m pip uninstall -y -q opencv-python-headless opencv-contrib-python-headless; fi
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $@

setup: $(BIN)/.installed

# Main job: index a photo collection (default: the grocery photos of the train/val splits and
# the catalogue images; re-used when the index exists) and serve the search page on it.
# Another folder: make demo DEMO_DATA=/path/to/photos DEMO_INDEX=other-index
demo: setup
	@if [ -f $(DEMO_INDEX)/manifest.json ]; then echo "re-using $(DEMO_INDEX)"; else \
	  $(BIN)/waldo index build --data $(DEMO_DATA) $(if $(DEMO_WHERE),--where $(DEMO_WHERE)) \
	    --model $(DEMO_MODEL) $(DEMO_LOCAL) --out $(DEMO_INDEX); fi
	$(BIN)/waldo serve --index $(DEMO_INDEX) --host $(DEMO_HOST) --port $(DEMO_PORT)

test: setup
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_INDEX)
