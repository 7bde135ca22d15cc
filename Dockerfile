# queen-tw server image. PostgreSQL is external: set PG_HOST, PG_PORT, PG_USER, PG_PASSWORD,
# PG_DB (and any other option of README.md) in the environment. packaging/compose.yaml runs
# three of these over one PostgreSQL; tests/test_packaging_image.py lints this file.
#
#   docker build -t queen-tw .
#   docker run --read-only -v queen-buffers:/var/lib/queen/buffers -e PG_HOST=db queen-tw
#
# Two stages: the builder installs the package into a virtualenv under /opt/queen-tw; the
# runtime stage copies only that virtualenv, so no build context, pip cache or compiler
# reaches the image. Both stages use the same pinned base, so the venv's python symlink
# (/usr/local/bin/python3.11) resolves in the runtime stage too.

FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
# Only what the build needs (tests/test_packaging_claims.py builds from exactly these).
COPY pyproject.toml setup.cfg setup.py MANIFEST.in README.md ./
COPY queen_tw ./queen_tw
COPY twisted ./twisted
COPY sql ./sql

# A regular install (not editable, no [embedded] extra), bytecode compiled now. Then write
# twistd's plugin cache (twisted/plugins/dropin.cache) while site-packages is writable: the
# runtime user cannot write there and the root filesystem may be read-only.
RUN python -m venv /opt/queen-tw \
    && /opt/queen-tw/bin/pip install --no-warn-script-location . \
    && /opt/queen-tw/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && test -s /opt/queen-tw/lib/python3.11/site-packages/twisted/plugins/dropin.cache


FROM python:3.11.13-slim-bookworm

# Keep this equal to queen_tw.__version__ (tests/test_packaging_image.py checks it).
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="queen-tw" \
      org.opencontainers.image.description="PostgreSQL-backed message queue server on Twisted, wire-compatible with Queen MQ" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.13-slim-bookworm" \
      org.opencontainers.image.documentation="packaging/README.md"

# No .pyc written at run time (the install compiled them; the root may be read-only).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/queen-tw/bin:$PATH" \
    FILE_BUFFER_DIR=/var/lib/queen/buffers

# A fixed numeric uid/gid so volume ownership and runAsUser settings can name it.
RUN groupadd --system --gid 10001 queen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /var/lib/queen --shell /usr/sbin/nologin queen \
    && mkdir -p /var/lib/queen/buffers \
    && chown -R 10001:10001 /var/lib/queen

# Owned by root and read-only to the server: it writes only to the buffer volume.
COPY --from=builder /opt/queen-tw /opt/queen-tw

USER 10001:10001
WORKDIR /var/lib/queen
# The file buffer (pushes kept while PostgreSQL is unreachable) must outlive the container.
VOLUME ["/var/lib/queen/buffers"]
# The HTTP API (PORT). Peer sync (QUEEN_UDP_PEERS) also listens on UDP 6633 when it is
# configured; containers on one network reach it without a published port.
EXPOSE 6632

# Healthy = the server answers GET /health at all: 200, or 503 while PostgreSQL is away (it
# then keeps serving and buffers pushes; an unhealthy mark there would invite a restart that
# helps nothing). The body says which. Python's http.client, so no curl in the image; it
# assumes the default tcp listener (with QUEEN_LISTEN set, override the health check).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import http.client, os; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('PORT') or '6632'), timeout=2); c.request('GET', '/health'); c.getresponse()"]

# twistd is PID 1, without tini: it installs its own SIGTERM and SIGINT handlers (a graceful
# stop of at most 25 s: parked pops answered, accepted work drained, file buffer flushed),
# and the only children it has, the NUM_WORKERS workers, are spawned, signalled and reaped
# by the reactor. Give `docker stop -t 30` (compose: stop_grace_period: 30s); docker's
# default 10 s may cut a stop short.
STOPSIGNAL SIGTERM
CMD ["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "queen"]
