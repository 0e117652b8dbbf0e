# nbo: the decision service. Mirrors the README: install the package, migrate, serve.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
COPY migrations ./migrations
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
# LightGBM needs the OpenMP runtime.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 nbo
COPY --from=build /install /usr/local
USER nbo
WORKDIR /home/nbo
ENV NBO_DATA_DIR=/home/nbo/data \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/live').status != 200)"
# `nbo serve` applies migrations before it starts the server.
CMD ["nbo", "serve", "--host", "0.0.0.0", "--port", "8000"]
