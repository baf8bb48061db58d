# syntax=docker/dockerfile:1
# Grove images: one Dockerfile, two targets that differ only in the torch build.
#   docker build --target cpu  -t grove:cpu  .    # API, beat, CPU workers (exports, maintenance)
#   docker build --target cuda -t grove:cuda .    # GPU workers (fine-tuning, CUDA exports)
# Base images are pinned by version; pin them by digest too (PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:...)
# when you mirror them into your registry.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- base: the runtime every target shares -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    GROVE_STORAGE_DIR=/data/storage \
    GROVE_MODEL_STORE_DIR=/data/models \
    GROVE_WORK_DIR=/data/work
RUN useradd --create-home --uid 10001 --user-group grove \
 && mkdir -p /data /app && chown grove:grove /data /app
WORKDIR /app

# --- deps: the locked dependencies in a virtual environment, built once per torch flavour ----------
FROM base AS deps-common
RUN python -m venv /opt/venv
COPY requirements.lock ./

FROM deps-common AS deps-cpu
# torch from PyTorch's CPU index (no CUDA libraries: a much smaller image), everything else as locked.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
 && pip install --no-deps -r requirements.lock

FROM deps-common AS deps-cuda
# torch from PyPI is the CUDA build on Linux x86_64 and brings the nvidia-* runtime libraries; the host
# needs only the NVIDIA driver and the container toolkit.
RUN pip install "torch==2.13.0" \
 && pip install --no-deps -r requirements.lock

# --- the application, on top of either set of dependencies ----------------------------------------
FROM base AS app-source
COPY --chown=grove:grove pyproject.toml alembic.ini README.md ./
COPY --chown=grove:grove api ./api
COPY --chown=grove:grove worker ./worker
COPY --chown=grove:grove models ./models
COPY --chown=grove:grove jobs ./jobs
COPY --chown=grove:grove migrations ./migrations

FROM base AS cuda
COPY --from=deps-cuda /opt/venv /opt/venv
COPY --from=app-source /app /app
# Editable: the code runs from /app (static files included) and `grove` is on the PATH.
RUN pip install --no-deps -e .
USER grove
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]

# Last, so that a plain `docker build .` builds the CPU image.
FROM base AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
COPY --from=app-source /app /app
# Editable: the code runs from /app (static files included) and `grove` is on the PATH.
RUN pip install --no-deps -e .
USER grove
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
