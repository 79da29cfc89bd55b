# stepcache's image: the same code runs the workers (by default one consuming every queue), Flower and the API.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md constraints.txt celeryconfig.py ./
COPY common ./common
COPY tasks ./tasks
RUN pip install -c constraints.txt . && useradd --create-home stepcache && mkdir -p /data/assets /data/parquet /metrics \
    && chown -R stepcache /data /metrics
USER stepcache

CMD ["celery", "-A", "tasks", "worker"]
