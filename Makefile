# The two commands that do everything on a fresh machine:
#   make demo   generate a synthetic bank into the local SQLite database and run the pipeline on it
#   make test   install what the tests need and run them (SQLite and the local PostgreSQL)
# Both install the venv from requirements-test.lock (exact versions, checked by hash), so
# every machine and CI run the same packages; the venv is rebuilt when pyproject.toml or the
# lock changes. `make lock` (scripts/lock) regenerates the locks: the way to upgrade anything.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install lint lock bench clean

# --no-deps: the lock already lists every dependency, pinned and hashed; the package itself
# is built with the locked setuptools (--no-build-isolation), so nothing unlocked is fetched.
$(BIN)/nbo: pyproject.toml requirements-test.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements-test.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/nbo

demo: install
	$(BIN)/nbo demo

# OMP_NUM_THREADS=1: each xdist worker trains and scores with LightGBM; with OpenMP's
# default of one thread per core, two workers on a two-core machine oversubscribe it.
test: install
	bash scripts/test-services
	$(BIN)/ruff check service models tests bench examples migrations
	$(BIN)/mypy --strict service models
	OMP_NUM_THREADS=1 $(BIN)/pytest -n 2 --dist loadgroup

lint: install
	$(BIN)/ruff check service models tests bench examples migrations
	$(BIN)/ruff format --check service models tests bench examples migrations

lock:
	scripts/lock $(LOCK_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
