# queen-tw server image. PostgreSQL is external: set PG_HOST, PG_PORT, PG_USER, PG_PASSWORD,
# PG_DB (and any other option of README.md) in the environment.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FILE_BUFFER_DIR=/var/lib/queen/buffers

WORKDIR /build
# Only what the build needs (keeps local venvs and data dirs out without a .dockerignore).
COPY pyproject.toml setup.cfg setup.py MANIFEST.in README.md ./
COPY queen_tw ./queen_tw
COPY twisted ./twisted
COPY sql ./sql

# A regular install (not editable, no [embedded] extra); then build twistd's plugin cache
# while we can still write to site-packages, so the non-root server never tries to.
RUN pip install . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && cd / && rm -rf /build

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/queen --shell /usr/sbin/nologin queen \
    && mkdir -p /var/lib/queen/buffers \
    && chown -R queen:queen /var/lib/queen

USER queen
WORKDIR /var/lib/queen
VOLUME /var/lib/queen/buffers
# The HTTP API (PORT).  Nothing else listens: there is no peer sync yet.
EXPOSE 6632

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '6632'), timeout=2)"

# twistd handles SIGTERM (docker stop) with a graceful shutdown of up to 25 s: give it
# `docker stop -t 30` (compose: stop_grace_period: 30s); docker's default 10 s may cut it short.
CMD ["twistd", "-n", "--pidfile=", "queen"]
