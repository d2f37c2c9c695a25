# One image for every fleetplane service; docker-compose.yml picks the entry point.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends git bubblewrap \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY schemas ./schemas
COPY infra ./infra
RUN pip install --no-cache-dir -e .
ENV LITELLM_LOCAL_MODEL_COST_MAP=True \
    FLEETPLANE_BIND_HOST=0.0.0.0 \
    FLEETPLANE_LOG_JSON=true \
    FLEETPLANE_DATA_DIR=/tmp/fleetplane
USER nobody
