# Every target that runs project code depends on the virtual environment, so a fresh clone needs
# nothing but `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARDS ?= data/shards
URL_LIST ?=
SHARDS_ARGS ?=

.PHONY: install demo test shards validate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

shards: $(STAMP)
	$(PY) -m data_pipeline.shards --output $(SHARDS) $(if $(URL_LIST),--url-list $(URL_LIST)) $(SHARDS_ARGS)

validate: $(STAMP)
	$(PY) -m data_pipeline.validate $(SHARDS)

demo: $(STAMP)
	$(PY) -m data_pipeline.shards --output $(SHARDS) --incremental
	$(PY) -m data_pipeline.validate $(SHARDS)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf data runs
