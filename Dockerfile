# One image for every process of the gateway; docker-compose.yml picks the console script.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY quota_common ./quota_common
COPY lua ./lua
COPY sidecar ./sidecar
COPY sync_worker ./sync_worker
COPY billing_api ./billing_api
RUN pip install --no-cache-dir . && useradd --system quota && mkdir -p /var/lib/quota \
    && chown quota /var/lib/quota
USER quota
WORKDIR /var/lib/quota
