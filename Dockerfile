# syntax=docker/dockerfile:1
#
# selfcheckd container image.
#   docker build -t selfcheckd .
#   docker run --rm -p 9787:9787 --env-file selfcheckd.env selfcheckd
# Build stage: builds the project's wheel and installs it with its dependencies
# into /opt/venv. Runtime stage: python slim + that venv, nothing else; no
# compiler, no pip cache, no curl. tests/deploy/test_dockerfile.py pins these
# properties. docs/deploy-ecs.md explains the ECS side.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Extras to install with the wheel, e.g. --build-arg SELFCHECKD_EXTRAS=demo for
# an image that can run `selfcheckd demo`. Empty for production.
ARG SELFCHECKD_EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the wheel is made of (see .dockerignore): a code change does not
# invalidate the venv layer's cache any more than it must.
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# Every dependency ships manylinux wheels for amd64 and arm64, so the
# builder needs no compiler either; --prefer-binary keeps it that way.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && wheel="$(ls /wheels/selfcheckd-*.whl)" \
 && /opt/venv/bin/pip install --prefer-binary "${wheel}${SELFCHECKD_EXTRAS:+[$SELFCHECKD_EXTRAS]}" \
 && /opt/venv/bin/pip uninstall -y pip \
 && /opt/venv/bin/selfcheckd --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="selfcheckd" \
      org.opencontainers.image.description="End-to-end mail selfcheck and sinkhole leak watcher" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid/gid, so ECS task definitions and Kubernetes
# securityContexts can name it, and volume ownership is predictable.
RUN groupadd --system --gid 10001 selfcheckd \
 && useradd --system --uid 10001 --gid selfcheckd --no-create-home \
      --home-dir /var/lib/selfcheckd --shell /usr/sbin/nologin selfcheckd \
 && install -d -o selfcheckd -g selfcheckd -m 0750 /var/lib/selfcheckd
COPY --from=builder /opt/venv /opt/venv
# State (the leak watcher's state file: CloudWatch cursor, detector memory,
# alert outbox) lives here. Declared as a volume so that with
# readonlyRootFilesystem a bind mount at this path is created with the
# ownership above (ECS copies it from the image). The shipped ECS task
# definition mounts EFS here instead, so the state outlives the task, through
# an access point that acts as uid/gid 10001 (docs/deploy-ecs.md).
VOLUME ["/var/lib/selfcheckd"]
WORKDIR /var/lib/selfcheckd
USER 10001:10001
EXPOSE 9787
# Liveness only: /healthz answers while the event loop runs; it does not
# depend on mail flowing (that is what the selfcheck metrics and alerts are
# for). python's urllib, because the slim image has no curl. urlopen raises on
# any non-2xx status or connection error, so the exit code is the verdict.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9787/healthz', timeout=4)"]
# SIGTERM starts the graceful shutdown: everything after it draws on
# shutdown_grace (default 20 s), and every path ends within shutdown_grace + 5 s.
# Keep the orchestrator's stop timeout above that sum (ECS stopTimeout 30 > 25),
# or SIGKILL lands in the final state save and outbox flush.
STOPSIGNAL SIGTERM
ENTRYPOINT ["selfcheckd"]
CMD ["run"]
