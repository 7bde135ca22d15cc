"""``GET /metrics`` (JSON) and ``GET /metrics/prometheus`` (text 0.0.4), WIRE.md 3.8.

Both are public (WIRE.md 4.2). The JSON body describes the answering process; the Prometheus
exposition adds the cluster-wide families read from PostgreSQL at scrape time and answers
with the process families alone (and ``queen_file_buffer_db_healthy 0``) when PostgreSQL
does not answer: a scrape never fails because the database is down.
"""

from typing import Optional

from queen_tw.auth.levels import routed_klein
from queen_tw.errors import NotFound
from queen_tw.http.answers import answering_errors, json_answer
from queen_tw.metrics.wiring import PROMETHEUS_CONTENT_TYPE, Metrics


class MetricsRoutes:
    """The two metrics routes of one process.

    :param metrics: the process's metrics (None: both routes answer 404).
    """

    app = answering_errors(routed_klein())

    def __init__(self, metrics: Optional[Metrics] = None):
        self._metrics = metrics

    def _require(self) -> Metrics:
        if self._metrics is None:
            raise NotFound("Metrics are not collected by this server")
        return self._metrics

    @app.route("/metrics", methods=["GET"])
    def summary(self, request):
        return json_answer(request, 200, self._require().summary())

    @app.route("/metrics/prometheus", methods=["GET"])
    async def prometheus(self, request):
        body = await self._require().prometheus_text()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", PROMETHEUS_CONTENT_TYPE.encode())
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body
