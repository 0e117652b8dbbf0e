# The two commands that do everything on a fresh machine:
#   make demo   generate a synthetic bank into the local SQLite database and run the pipeline on it
#   make test   install what the tests need and run them (SQLite and the local PostgreSQL)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install lint bench clean

$(BIN)/nbo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/nbo

demo: install
	$(BIN)/nbo demo

test: install
	bash scripts/test-services
	$(BIN)/ruff check service models tests bench examples migrations
	$(BIN)/mypy --strict service models
	$(BIN)/pytest -n 2 --dist loadgroup

lint: install
	$(BIN)/ruff check service models tests bench examples migrations
	$(BIN)/ruff format --check service models tests bench examples migrations

clean:
	rm -rf $(VENV) data .pytest_cache
