# One image for the API and the workers. Build: docker build -t grove .
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    GROVE_STORAGE_DIR=/data/storage \
    GROVE_MODEL_STORE_DIR=/data/models \
    GROVE_WORK_DIR=/data/work

WORKDIR /app

# torch first, with its own dependencies: on Linux x86_64 this is the CUDA build and pulls the
# nvidia-* runtime libraries the GPU workers need. Everything else is installed exactly as locked.
COPY requirements.lock pyproject.toml ./
RUN pip install "torch==2.13.0" \
 && pip install --no-deps -r requirements.lock

COPY api ./api
COPY worker ./worker
COPY models ./models
COPY migrations ./migrations
COPY alembic.ini README.md ./
RUN pip install --no-deps . \
 && useradd --create-home --uid 10001 grove \
 && mkdir -p /data && chown grove /data

USER grove
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
