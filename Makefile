# The two commands a fresh machine needs:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WALDO_DATA ?= ../shared/data
DEMO_INDEX ?= demo-index
DEMO_QUERY ?= $(WALDO_DATA)/grocery_store/dataset/test/Fruit/Banana/Banana_001.jpg
export WALDO_DATA

.PHONY: setup demo test test-fast clean-demo

# The venv is rebuilt only when pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# Main job: index the grocery photos (train/val splits and catalogue images; re-used when it
# exists) and answer a query with a held-out test photo.
demo: setup
	@if [ -f $(DEMO_INDEX)/manifest.json ]; then echo "re-using $(DEMO_INDEX)"; else \
	  $(BIN)/waldo index build --data $(WALDO_DATA)/grocery_store --where split=train,val,gallery \
	    --backbone efficientnet_lite0 --out $(DEMO_INDEX); fi
	$(BIN)/waldo search $(DEMO_QUERY) --index $(DEMO_INDEX) -k 10

test: setup
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf $(DEMO_INDEX)
