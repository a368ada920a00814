# One image for workers and Flower (and for submitting from inside the compose network).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py cli.py ./
COPY luminagrid ./luminagrid
RUN pip install . && useradd --create-home --uid 1000 luminagrid
USER luminagrid

# Workers run OpenCV single-threaded; Celery's prefork pool uses one process per CPU.
CMD ["celery", "-A", "luminagrid", "worker", "--loglevel", "INFO"]
