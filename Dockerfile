# syntax=docker/dockerfile:1
# One image for the API, the worker and migrations; the command picks the role:
#   research-service api --host 0.0.0.0 --port 8000    (the default)
#   research-service worker                             (metrics on :9102)
#   research-service migrate                            (one-shot, before api and worker)
# Built from requirements.lock, the versions CI tested. See docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml requirements.lock README.md ./
COPY service ./service
COPY worker ./worker
COPY sandbox ./sandbox
# The lock constrains every dependency; the project itself is the only unpinned install. No
# extras: the devstack wheels (embedded PostgreSQL and Redis, ~50 MB) and the dev tools stay out.
# The sandbox stays in (`research-service sandbox`): it is the project's own code, no extra deps.
RUN pip install --no-cache-dir -c requirements.lock . \
    && python -m compileall -q /opt/venv

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000 9102
# The API's liveness; compose and Kubernetes give the worker its own check (its metrics port).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["research-service"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
