"""``GET /api/v1/resources/queues/{queue}/depth[?group=]`` (WIRE2 10, ``Admin.get_queue_depth``
of the 2.6.0 client): a queue's backlog per partition, with a conflating group's
``effectivePending``."""


from queen_tw.auth.levels import routed_klein
from queen_tw.engine.depth import queue_depth
from queen_tw.engine.queue_engine import QueueEngine
from queen_tw.errors import InvalidRequest
from queen_tw.http import parsing, query
from queen_tw.http.answers import answering_errors, json_answer


class DepthRoutes:
    """The queue depth route.

    :param engine: whose database the report is read from.
    """

    app = answering_errors(routed_klein())

    def __init__(self, engine: QueueEngine):
        self._engine = engine

    @app.route("/api/v1/resources/queues/<queue>/depth", methods=["GET"])
    async def depth(self, request, queue):
        group = query.text(request, "group") or None
        if group is not None and len(group) > parsing.MAX_NAME_LENGTH:
            raise InvalidRequest(f"group is longer than {parsing.MAX_NAME_LENGTH} characters")
        return json_answer(request, 200, await queue_depth(
            self._engine.database, parsing.check_name(queue, "queue"), group))
