"""The message path of WIRE.md 2.2-2.6: push, pop, ack, transaction and lease extension.

Push, pop and ack are also reached without Klein through :mod:`queen_tw.http.hot_routes`,
which calls the same methods. Pushes (plain and in transactions) carry the ``producerSub``
the auth gate admitted the request with (:func:`~queen_tw.http.auth_gate.producer_sub`).
"""

import dataclasses
import uuid
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.auth.levels import routed_klein
from queen_tw.engine.autopilot import AUTOPILOT_BATCH
from queen_tw.engine.queue_engine import QUEUE_MODE, PopRequest, QueueEngine
from queen_tw.errors import InvalidRequest
from queen_tw.http import binary_push, parsing, query
from queen_tw.http.answers import answering_errors, json_answer, no_content
from queen_tw.http.auth_gate import producer_sub

log = Logger()

MAX_POP_BATCH = 10_000


@dataclasses.dataclass(frozen=True)
class PopDefaults:
    """Server defaults of the pop parameters a request leaves out (WIRE.md 2.3.1)."""

    batch: int
    timeout_ms: int
    subscription_mode: str


class MessagingRoutes:
    """Routes of the message path, bound to one engine.

    :param engine: the message path.
    :param defaults: pop parameters a request leaves out.
    """

    app = answering_errors(routed_klein())

    def __init__(self, engine: QueueEngine, defaults: PopDefaults):
        self._engine = engine
        self._defaults = defaults

    @app.route("/api/v1/push", methods=["POST"])
    async def push(self, request):
        if binary_push.is_binary(request):
            return await self._push_binary(request)
        items = parsing.push_items(parsing.read_json_object(request), producer_sub(request),
                                   parsing.push_limit(request))
        return json_answer(request, 201, await self._engine.push(items))

    async def _push_binary(self, request):
        """A ``QPB1`` body (WIRE2.md 9.1, 9.2): answered as its JSON push would be, or
        with the counts only when it asks (flag 2)."""
        body = binary_push.read_push(request)
        results = await self._engine.push(body.items)
        return json_answer(request, 201,
                           binary_push.counts_answer(results) if body.counts_only else results)

    # -- pop ----------------------------------------------------------------------------

    @app.route("/api/v1/pop/queue/<queue>", methods=["GET"])
    def pop_any_partition(self, request, queue):
        return self._pop(request, self._pop_request(
            request, parsing.check_name(queue, "queue"), None))

    @app.route("/api/v1/pop/queue/<queue>/partition/<partition>", methods=["GET"])
    def pop_one_partition(self, request, queue, partition):
        return self._pop(request, self._pop_request(
            request, parsing.check_name(queue, "queue"),
            parsing.check_name(partition, "partition")))

    @app.route("/api/v1/pop", methods=["GET"])
    def pop_by_namespace(self, request):
        namespace = query.text(request, "namespace")
        task = query.text(request, "task")
        if not namespace and not task:
            raise InvalidRequest("namespace or task is required")
        return self._pop(request, dataclasses.replace(
            self._pop_request(request, None, None),
            namespace=namespace or None, task=task or None))

    def _pop(self, request, wanted: PopRequest) -> defer.Deferred:
        # Klein cancels a route's Deferred when its client leaves; a cancel reaching the pop
        # would drop a delivery its SQL still makes (leased to nobody until expiry). The pop
        # watches ``gone`` instead and gives back what it took.
        return _shielded(defer.ensureDeferred(self._pop_answer(request, wanted)))

    async def _pop_answer(self, request, wanted: PopRequest) -> bytes:
        gone = request.notifyFinish()
        gone.addErrback(lambda _: None)  # a client that left is not an error
        delivery = await self._engine.pop(wanted, gone)
        if delivery is None:
            empty = self._engine.popper.empty_answer(wanted)
            return no_content(request) if empty is None else json_answer(request, 200, empty)
        return json_answer(request, 200, delivery)

    def _pop_request(self, request, queue: Optional[str],
                     partition: Optional[str]) -> PopRequest:
        group = query.text(request, "consumerGroup") or QUEUE_MODE
        if len(group) > parsing.MAX_NAME_LENGTH:
            raise InvalidRequest(
                f"consumerGroup is longer than {parsing.MAX_NAME_LENGTH} characters")
        autopilot = query.flag(request, "autopilot")
        conflation = query.flag(request, "conflation")
        auto_ack = query.flag(request, "autoAck")
        if conflation and group == QUEUE_MODE:
            raise InvalidRequest("conflation needs a consumerGroup (queue mode never conflates)")
        if conflation and auto_ack:
            raise InvalidRequest("conflation cannot be combined with autoAck")
        # WIRE2 8.3: under autopilot an omitted batch is the server's to choose.
        batch = query.integer(request, "batch",
                              AUTOPILOT_BATCH if autopilot else self._defaults.batch, 1)
        partitions = query.integer(request, "partitions", 0, 1) or None
        return PopRequest(
            queue=queue, partition=partition, consumer_group=group,
            batch=min(batch, MAX_POP_BATCH),
            partitions=partitions if partition is None else None,
            autopilot=autopilot, conflation=conflation, auto_ack=auto_ack,
            wait=query.flag(request, "wait"),
            # WIRE.md 2.3.1: a timeout <= 0 answers at once
            timeout_ms=query.integer(request, "timeout", self._defaults.timeout_ms,
                                     -query.INT32_MAX),
            # WIRE.md 2.3.1: new or new-only start at now; any other value is all (the
            # official test suites send from_beginning)
            subscription_mode=(query.text(request, "subscriptionMode")
                               or self._defaults.subscription_mode),
            subscription_from=query.text(request, "subscriptionFrom"))

    # -- ack, transaction, lease --------------------------------------------------------

    @app.route("/api/v1/ack", methods=["POST"])
    async def ack(self, request):
        item = parsing.ack_item(parsing.read_json_object(request), None, 0)
        return json_answer(request, 200, await self._engine.ack([item]))

    @app.route("/api/v1/ack/batch", methods=["POST"])
    async def ack_batch(self, request):
        body = parsing.read_json_object(request)
        acks = body.get("acknowledgments")
        if not isinstance(acks, list):
            raise InvalidRequest("acknowledgments array is required")
        group = parsing.optional_text(body, "consumerGroup")
        items = [parsing.ack_item(item, group, index) for index, item in enumerate(acks)]
        if not items:
            return json_answer(request, 200, [])
        return json_answer(request, 200, await self._engine.ack(items))

    @app.route("/api/v1/transaction", methods=["POST"])
    async def transaction(self, request):
        binary = binary_push.read_transaction(request) if binary_push.is_binary(request) else None
        body = binary.as_json_body() if binary else parsing.read_json_object(request)
        ops = parsing.transaction_operations(body, producer_sub(request),
                                             parsing.push_limit(request))
        leases = parsing.required_leases(body)
        riders = parsing.transaction_riders(body)
        unknown = next((op for op in ops if op["type"] not in ("push", "ack")), None)
        if unknown is not None:
            # WIRE.md 2.5: an unknown operation fails the transaction (200, success false),
            # which has an id like every other (nothing was evaluated: no results).
            return json_answer(request, 200, {
                "transactionId": str(uuid.uuid4()), "success": False, "results": [],
                "error": f"Unknown operation type: {unknown['type']}"})
        if riders.get("timers"):
            riders = dict(riders, producerSub=producer_sub(request))  # the timers' scheduler
        outcome = await self._engine.transaction(ops, leases, riders)
        if binary and binary.counts_only:
            outcome = binary_push.transaction_counts(outcome, ops)
        return json_answer(request, 200, outcome)

    @app.route("/api/v1/lease/<lease_id>/extend", methods=["POST"])
    async def extend_lease(self, request, lease_id):
        lease_id = parsing.require_uuid(parsing.path_text(lease_id, "leaseId"), "leaseId")
        body = parsing.read_json_object(request)
        seconds = body.get("seconds")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)
                                    or not 0 < seconds <= query.INT32_MAX):
            raise InvalidRequest("seconds must be a positive integer")
        renewal = await self._engine.renew_lease(lease_id, seconds)
        expires = renewal["expiresAt"]
        return json_answer(request, 200, {  # every name a client reads it by (WIRE2.md 10)
            "leaseId": lease_id, "success": True, "renewed": renewal["renewed"],
            "leaseExpiresAt": expires, "newExpiresAt": expires, "expiresAt": expires,
            "lease_expires_at": expires})


def _shielded(work: defer.Deferred) -> defer.Deferred:
    """``work``'s outcome, in a Deferred whose cancellation does not reach ``work``."""
    shield: defer.Deferred = defer.Deferred()

    def passed(outcome: Any) -> None:
        if not shield.called:
            if isinstance(outcome, Failure):
                shield.errback(outcome)
            else:
                shield.callback(outcome)
        elif isinstance(outcome, Failure):  # the client left before it failed
            log.failure("pop failed after its client left", outcome)

    work.addBoth(passed)
    return shield
