# The demo app (demo_app/) with loopwatch, for docker-compose.yml. Build context: the
# repository root (`docker compose -f grafana/docker-compose.yml up` sets it).
FROM python:3.12-slim

WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md ./
COPY loopwatch ./loopwatch
RUN pip install ".[demo]"
COPY demo_app ./demo_app
COPY grafana/load.py ./load.py

# LOOPWATCH_METRICS_HOST=0.0.0.0 so that Prometheus, in another container, reaches the side port.
ENV LOOPWATCH_METRICS_PORT=9100 LOOPWATCH_METRICS_HOST=0.0.0.0 DEMO_WORK_SECONDS=0.3
EXPOSE 8000 9100
CMD ["uvicorn", "demo_app.main:app", "--host", "0.0.0.0", "--port", "8000"]
