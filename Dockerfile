# Two images. The last stage, built by default, is the gateway: one image for every process,
# docker-compose.yml picks the console script. The `localstripe` stage is development's Stripe.

FROM python:3.11-slim AS localstripe
RUN pip install --no-cache-dir localstripe==1.15.10 && useradd --system localstripe
COPY scripts/localstripe /usr/local/bin/localstripe-dev
USER localstripe

FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY quota_common ./quota_common
COPY lua ./lua
COPY sidecar ./sidecar
COPY sync_worker ./sync_worker
COPY billing_api ./billing_api
# The journal directory exists in the image, owned by the service user: a new named volume
# mounted on it starts with that owner (a directory Docker makes for a mount is root's).
RUN pip install --no-cache-dir . && useradd --system quota \
    && mkdir -p /var/lib/quota/journal && chown -R quota /var/lib/quota
USER quota
WORKDIR /var/lib/quota
