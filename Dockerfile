# nbo: the decision service. Mirrors the README: install the locked dependencies and the
# package, migrate, serve. Build with the commit it comes from:
#   docker build --build-arg NBO_BUILD_COMMIT=$(git rev-parse HEAD) -t nbo .
FROM python:3.11-slim AS build
RUN python -m venv /opt/nbo
WORKDIR /src
# Exactly the versions in the lock, each file checked against its sha256 (scripts/lock makes
# it); this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN /opt/nbo/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY migrations ./migrations
# The package alone: its dependencies came from the lock, and so did the setuptools that builds it.
RUN /opt/nbo/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11-slim
# LightGBM needs the OpenMP runtime.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 nbo \
    && install -d -o nbo -g nbo -m 0700 /home/nbo/data
COPY --from=build /opt/nbo /opt/nbo
USER nbo
WORKDIR /home/nbo
ENV PATH=/opt/nbo/bin:$PATH \
    NBO_DATA_DIR=/home/nbo/data \
    PYTHONUNBUFFERED=1
EXPOSE 8000
# /health/live answers only once a worker has started, and a worker starts after it has
# migrated the database and loaded its snapshot (model, bank, contact history): until then
# the port does not answer. The README's start-up figures (bench/startup.py, 100k customers)
# are 24 s on SQLite and 48 s on PostgreSQL with 3.2M offers in the policy windows; 120 s
# leaves over twice that. A bigger bank needs more: docker run --health-start-period.
HEALTHCHECK --interval=30s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live').status != 200)"
# Last, so a new commit rebuilds no layer above. Reported by the nbo_build_info metric.
ARG NBO_BUILD_COMMIT=""
ENV NBO_BUILD_COMMIT=${NBO_BUILD_COMMIT}
# `nbo serve` applies migrations (under a lock, so replicas may start together) before it
# starts the server; with a separate migration step, run it with --no-migrate.
CMD ["nbo", "serve", "--host", "0.0.0.0", "--port", "8000"]
