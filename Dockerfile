# One image for workers and Flower (and for submitting from inside the compose network).
# The base comes from .env (PYTHON_IMAGE): Docker Hub's python:3.12-slim, or one made locally
# by deploy/base-images.sh where Docker Hub cannot be reached. It must have `pip` on PATH.
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py cli.py ./
COPY luminagrid ./luminagrid
RUN pip install . && useradd --create-home --uid 1000 luminagrid
USER luminagrid

# Workers run OpenCV single-threaded; Celery's prefork pool uses one process per CPU.
CMD ["celery", "-A", "luminagrid", "worker", "--loglevel", "INFO"]
