"""Consumer-group routes (WIRE.md 3.5): listing, lag, deletion, subscription and seeking.

They need the admin engines and answer 404 without them.
"""

from typing import Optional

from queen_tw.auth.levels import routed_klein
from queen_tw.engine.admin import AdminEngines
from queen_tw.engine.consumer_groups import ConsumerGroups
from queen_tw.errors import InvalidRequest, NotFound
from queen_tw.http import parsing, query
from queen_tw.http.answers import answering_errors, json_answer


class GroupRoutes:
    """Routes over consumer groups.

    :param admin: the consumer-group engine lives here; every route answers 404 without it.
    """

    app = answering_errors(routed_klein())

    def __init__(self, admin: Optional[AdminEngines] = None):
        self._admin = admin

    def _groups(self) -> ConsumerGroups:
        if self._admin is None:
            raise NotFound("Not found")
        return self._admin.groups

    @app.route("/api/v1/consumer-groups", methods=["GET"])
    async def list_groups(self, request):
        return json_answer(request, 200, await self._groups().list())

    @app.route("/api/v1/consumer-groups/lagging", methods=["GET"])
    async def lagging_groups(self, request):
        seconds = query.integer(request, "minLagSeconds", 3600, 0)
        return json_answer(request, 200, await self._groups().lagging(seconds))

    @app.route("/api/v1/consumer-groups/<group>", methods=["GET"])
    async def group_detail(self, request, group):
        return json_answer(request, 200, await self._groups().detail(
            parsing.group_name(group)))

    @app.route("/api/v1/consumer-groups/<group>", methods=["DELETE"])
    async def delete_group(self, request, group):
        return json_answer(request, 200, await self._groups().delete(
            parsing.group_name(group), None,
            query.flag(request, "deleteMetadata", True)))

    @app.route("/api/v1/consumer-groups/<group>/queues/<queue>", methods=["DELETE"])
    async def delete_group_for_queue(self, request, group, queue):
        return json_answer(request, 200, await self._groups().delete(
            parsing.group_name(group), parsing.check_name(queue, "queue"),
            query.flag(request, "deleteMetadata", True)))

    @app.route("/api/v1/consumer-groups/<group>/subscription", methods=["POST"])
    async def update_subscription(self, request, group):
        timestamp = parsing.required_timestamp(
            parsing.read_json_object(request), "subscriptionTimestamp",
            "Missing subscriptionTimestamp in request body")
        return json_answer(request, 200, await self._groups().set_subscription_timestamp(
            parsing.group_name(group), timestamp))

    @app.route("/api/v1/consumer-groups/<group>/queues/<queue>/seek", methods=["POST"])
    async def seek(self, request, group, queue):
        body = parsing.read_json_object(request)
        to_end = body.get("toEnd") is True
        if not to_end and not body.get("timestamp"):
            raise InvalidRequest("Must specify either 'toEnd': true or 'timestamp'")
        timestamp = None if to_end else parsing.timestamp(
            parsing.optional_text(body, "timestamp"), "timestamp")
        return json_answer(request, 200, await self._groups().seek(
            parsing.group_name(group), parsing.check_name(queue, "queue"),
            to_end, timestamp))

    @app.route("/api/v1/consumer-groups/<group>/queues/<queue>/partitions/<partition>/seek",
               methods=["POST"])
    async def seek_partition(self, request, group, queue, partition):
        return json_answer(request, 200, await self._groups().seek_partition(
            parsing.group_name(group), parsing.check_name(queue, "queue"),
            parsing.check_name(partition, "partition")))
