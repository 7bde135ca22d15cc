"""What this process did, counted in memory on the message path.

The engine calls :class:`Recorder` once per push, pop, ack and transaction: a few integer
additions and one histogram observation, no lock (the reactor thread is the only writer;
``writing`` only orders a write of the totals against a scrape reading them), no database
write. The aggregator takes what was counted as an :class:`Interval` every
METRICS_AGGREGATE_INTERVAL_S and writes it to PostgreSQL; an interval that could not be
written stays with the recorder and is merged into the next one, so no count is lost to an
outage (only the interval rows become one longer row).
"""

import time
from collections import Counter
from datetime import datetime
from operator import itemgetter
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from twisted.internet import defer

from queen_tw.clock import DatabaseTime
from queen_tw.engine.popper import Delivery
from queen_tw.metrics.histogram import AGE_BOUNDS_MS, LATENCY_BOUNDS_S, Histogram

OPS: Tuple[str, ...] = ("push", "pop", "ack", "transaction")
"""Operations whose latency is measured."""

WORKER_COUNTERS: Tuple[str, ...] = (
    "push_requests", "push_messages", "pop_requests", "pop_messages", "pop_empty",
    "ack_requests", "ack_messages", "ack_success", "ack_failed", "transactions", "dlq",
    "db_errors")
"""Counters of one worker, as named in ``queen.worker_metrics`` and ``queen.metrics_totals``."""

QUEUE_COUNTERS: Tuple[str, ...] = (
    "push_requests", "push_messages", "pop_requests", "pop_messages", "pop_empty",
    "ack_success", "ack_failed", "transactions", "dlq")
"""Counters of one queue, as named in ``queen.queue_metrics``."""

_SUCCESS_STATUSES = frozenset({"completed", "success"})
_FAILED_STATUSES = frozenset({"failed", "dlq"})
_QUEUE_OF = itemgetter("queue")
_ACCEPTED = frozenset({"queued", "buffered"})
_STATUS_OF = itemgetter("status")
_QUEUE_NAME_OF = itemgetter("queueName")
_SUCCESS_OF = itemgetter("success")
_DLQ_OF = itemgetter("dlq")

# Pop answers carry their messages as PostgreSQL's JSON text (see queen_tw.engine.popper).
# Payloads inside it are jsonb's text form, which always writes '", "' and '": "' with a
# space, so these two markers (written without one by queen.pop_messages) only ever match a
# message's own fields: one message end per message, and the first createdAt is the first
# message's, the oldest of its partition.
_MESSAGE_END = '","retryCount":'
_CREATED_AT = '"createdAt":"'


class Counts:
    """One value per name of :data:`WORKER_COUNTERS`, all 0 at first."""

    __slots__ = WORKER_COUNTERS
    push_requests: int
    push_messages: int
    pop_requests: int
    pop_messages: int
    pop_empty: int
    ack_requests: int
    ack_messages: int
    ack_success: int
    ack_failed: int
    transactions: int
    dlq: int
    db_errors: int

    def __init__(self) -> None:
        for name in WORKER_COUNTERS:
            setattr(self, name, 0)

    def add(self, other: "Counts") -> None:
        for name in WORKER_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in WORKER_COUNTERS}

    @property
    def requests(self) -> int:
        """Requests of the four operations."""
        return self.push_requests + self.pop_requests + self.ack_requests + self.transactions

    @property
    def messages(self) -> int:
        """Messages pushed, delivered and acknowledged."""
        return self.push_messages + self.pop_messages + self.ack_messages


class QueueActivity:
    """What one queue saw: :data:`QUEUE_COUNTERS` and the age of delivered messages (ms)."""

    __slots__ = QUEUE_COUNTERS + ("lag",)
    push_requests: int
    push_messages: int
    pop_requests: int
    pop_messages: int
    pop_empty: int
    ack_success: int
    ack_failed: int
    transactions: int
    dlq: int

    def __init__(self) -> None:
        for name in QUEUE_COUNTERS:
            setattr(self, name, 0)
        self.lag = Histogram(AGE_BOUNDS_MS)

    def add(self, other: "QueueActivity") -> None:
        for name in QUEUE_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lag.merge(other.lag)

    def as_dict(self) -> Dict[str, int]:
        return {name: getattr(self, name) for name in QUEUE_COUNTERS}


class Interval:
    """Everything counted between ``started`` and ``ended`` (Unix seconds)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.ended = started
        self.counts = Counts()
        self.queues: Dict[str, QueueActivity] = {}
        self.latency = {op: Histogram(LATENCY_BOUNDS_S) for op in OPS}
        self.loop_lag = Histogram(AGE_BOUNDS_MS)

    def queue(self, name: str) -> QueueActivity:
        activity = self.queues.get(name)
        if activity is None:
            activity = self.queues[name] = QueueActivity()
        return activity

    def absorb(self, later: "Interval") -> None:
        """Adds ``later`` (the next interval) to this one, which then ends where it ends."""
        self.ended = later.ended
        self.counts.add(later.counts)
        for name, activity in later.queues.items():
            self.queue(name).add(activity)
        for op, histogram in later.latency.items():
            self.latency[op].merge(histogram)
        self.loop_lag.merge(later.loop_lag)

    def pop_lag(self) -> Histogram:
        """The age of every message delivered in the interval, all queues together."""
        every = Histogram(AGE_BOUNDS_MS)
        for activity in self.queues.values():
            every.merge(activity.lag)
        return every


class Recorder:
    """The in-process counters of one worker.

    :param wall: Unix time (interval bounds, message age), read through
        :attr:`database_time`, so that both follow PostgreSQL's clock once a metrics write
        has measured it (buckets are judged by its ``now()``, ages are from its createdAt).
    :param db_errors: the pool's count of failed calls so far (read when an interval ends).
    """

    def __init__(self, wall: Callable[[], float] = time.time,
                 db_errors: Callable[[], int] = lambda: 0):
        self.database_time = DatabaseTime(wall)
        self._wall = self.database_time
        self._db_errors = db_errors
        self._db_errors_seen = 0
        self.current = Interval(wall())
        self._unwritten: Optional[Interval] = None
        # Held by a write of the unwritten counts and by a scrape's read of the written
        # totals: a write finishing between that read and the scrape's look at
        # unwritten() dropped its interval from the sum (the counter went down).
        self.writing = defer.DeferredLock()
        self.lifetime = Counts()
        self.lifetime_latency = {op: Histogram(LATENCY_BOUNDS_S) for op in OPS}

    # -- the message path: called once per request ----------------------------------------

    def pushed(self, items: List[Dict[str, Any]], results: List[Dict[str, Any]],
               seconds: float) -> None:
        """A push of ``items`` (validated, with their ``queue``) answered ``results`` after
        ``seconds``. Messages count when stored or buffered: not a duplicate (nothing new)
        nor an item refused (maxSize, data PostgreSQL refused)."""
        interval = self.current
        interval.counts.push_requests += 1
        interval.latency["push"].observe(seconds)
        statuses = list(map(_STATUS_OF, results))
        if statuses.count("queued") + statuses.count("buffered") == len(statuses):
            accepted = items  # the usual push: every item stored, checked at C speed
        else:
            accepted = [item for item, status in zip(items, statuses, strict=True)
                        if status in _ACCEPTED]
        interval.counts.push_messages += len(accepted)
        for queue in set(map(_QUEUE_OF, items)):
            interval.queue(queue).push_requests += 1
        per_queue: Iterable[Tuple[str, int]]
        if len(accepted) == 1:
            per_queue = ((accepted[0]["queue"], 1),)
        else:
            per_queue = Counter(map(_QUEUE_OF, accepted)).items()
        for queue, count in per_queue:
            interval.queue(queue).push_messages += count

    def popped(self, queue: Optional[str], delivery: Optional[Mapping[str, Any]],
               seconds: Optional[float]) -> None:
        """A pop on ``queue`` (None: by namespace/task) answered ``delivery`` (None: empty)
        after ``seconds`` (None: not measured, a long poll's time is the wait)."""
        interval = self.current
        interval.counts.pop_requests += 1
        if seconds is not None:
            interval.latency["pop"].observe(seconds)
        if delivery is None:
            interval.counts.pop_empty += 1
            if queue is not None:
                activity = interval.queue(queue)
                activity.pop_requests += 1
                activity.pop_empty += 1
            return
        count, oldest = delivery_facts(delivery)
        interval.counts.pop_messages += count
        activity = interval.queue(delivery.get("queue") or queue or "")
        activity.pop_requests += 1
        activity.pop_messages += count
        if oldest is not None:
            activity.lag.observe(max(self._wall() - oldest, 0.0) * 1000.0)

    def follow_database_time(self, database_now: float, sent: float, received: float) -> None:
        """PostgreSQL's clock read ``database_now`` during a call between ``sent`` and
        ``received`` (local wall time): from now on times follow it, the interval under way
        included (it began on the offset measured before)."""
        before = self.database_time.offset
        self.database_time.observe(database_now, sent, received)
        self.current.started += self.database_time.offset - before

    def acked(self, items: List[Dict[str, Any]], results: List[Dict[str, Any]],
              seconds: float) -> None:
        """Acks of ``items`` (with their ``status``) answered ``results`` (with ``success``,
        ``queueName`` and ``dlq``: the failed ack moved the message to the dead-letter
        queue) after ``seconds``. Completed acks count as success, failed ones as failed,
        refused ones (no such message, lease lost) and retries as neither."""
        interval = self.current
        counts = interval.counts
        counts.ack_requests += 1
        counts.ack_messages += len(items)
        interval.latency["ack"].observe(seconds)
        if len(items) > 1 and self._acked_alike(interval, items, results):
            return
        for item, result in zip(items, results, strict=True):
            if not result.get("success"):
                continue
            activity = interval.queue(result.get("queueName") or "")
            status = item.get("status")
            if status in _SUCCESS_STATUSES:
                counts.ack_success += 1
                activity.ack_success += 1
            elif status in _FAILED_STATUSES:
                counts.ack_failed += 1
                activity.ack_failed += 1
            if result.get("dlq"):
                counts.dlq += 1
                activity.dlq += 1

    @staticmethod
    def _acked_alike(interval: Interval, items: List[Dict[str, Any]],
                     results: List[Dict[str, Any]]) -> bool:
        """The usual batch (one status, one queue, every ack accepted) counted with C-level
        passes instead of a Python loop per item; False when the batch is mixed."""
        try:
            statuses = set(map(_STATUS_OF, items))
            queues = set(map(_QUEUE_NAME_OF, results))
            accepted = sum(map(_SUCCESS_OF, results))
            dead = sum(map(_DLQ_OF, results))
        except KeyError:
            return False
        if len(statuses) != 1 or len(queues) != 1 or accepted != len(results):
            return False
        [status], [queue] = statuses, queues
        counts, activity = interval.counts, interval.queue(queue or "")
        if status in _SUCCESS_STATUSES:
            counts.ack_success += accepted
            activity.ack_success += accepted
        elif status in _FAILED_STATUSES:
            counts.ack_failed += accepted
            activity.ack_failed += accepted
        counts.dlq += dead
        activity.dlq += dead
        return True

    def transacted(self, operations: List[Dict[str, Any]], outcome: Mapping[str, Any],
                   seconds: float) -> None:
        """A transaction of ``operations`` answered ``outcome`` after ``seconds``; it counts
        for each queue it pushed to. A committed one also counts what it did as the push and
        ack routes would: messages stored, ack results, dead-letter moves (not as requests:
        the request was the transaction)."""
        interval = self.current
        counts = interval.counts
        counts.transactions += 1
        interval.latency["transaction"].observe(seconds)
        queues = {item["queue"] for op in operations if op.get("type") == "push"
                  for item in op.get("items", ())}
        for queue in queues:
            interval.queue(queue).transactions += 1
        if not outcome.get("success"):
            return  # rolled back: nothing of it happened
        results = outcome.get("results") or []
        for result in results:
            if result.get("type") == "push" and result.get("status") == "queued":
                counts.push_messages += 1
                interval.queue(result.get("queueName") or "").push_messages += 1
        acks = [result for result in results if result.get("type") == "ack"]
        ack_ops = [op for op in operations if op.get("type") == "ack"]
        for op, result in zip(ack_ops, acks, strict=False):  # one result per ack op
            counts.ack_messages += 1
            status = op.get("status") or "completed"
            if status in _SUCCESS_STATUSES:
                counts.ack_success += 1
            elif status in _FAILED_STATUSES:
                counts.ack_failed += 1
            if result.get("dlq"):
                counts.dlq += 1

    def dead_lettered(self, queue: str) -> None:
        """An operator moved a message of ``queue`` to the dead-letter queue."""
        interval = self.current
        interval.counts.dlq += 1
        interval.queue(queue).dlq += 1

    def failed(self, op: str, seconds: float) -> None:
        """A request of ``op`` raised (refused input, overload, outage) after ``seconds``."""
        interval = self.current
        counter = "transactions" if op == "transaction" else f"{op}_requests"
        setattr(interval.counts, counter, getattr(interval.counts, counter) + 1)
        interval.latency[op].observe(seconds)

    def loop_lag(self, milliseconds: float) -> None:
        """How late the sampler ran (the reactor was busy that long)."""
        self.current.loop_lag.observe(milliseconds)

    # -- the aggregator ----------------------------------------------------------------

    def take_interval(self) -> Interval:
        """Ends the current interval and returns it, merged after any interval whose write
        failed; it stays unwritten until :meth:`written`."""
        interval, self.current = self.current, Interval(self._wall())
        interval.ended = self.current.started
        errors = self._db_errors()
        interval.counts.db_errors += errors - self._db_errors_seen
        self._db_errors_seen = errors
        self.lifetime.add(interval.counts)
        for op, histogram in interval.latency.items():
            self.lifetime_latency[op].merge(histogram)
        if self._unwritten is not None:
            self._unwritten.absorb(interval)
            interval = self._unwritten
        self._unwritten = interval
        return interval

    def written(self) -> None:
        """The interval last taken is stored: it no longer counts as unwritten."""
        self._unwritten = None

    def unwritten(self) -> Counts:
        """Counts not in ``queen.metrics_totals`` yet: the interval being (or not) written
        and the current one; what a scrape adds to the cluster totals read from PostgreSQL."""
        counts = Counts()
        if self._unwritten is not None:
            counts.add(self._unwritten.counts)
        counts.add(self.current.counts)
        counts.db_errors += self._db_errors() - self._db_errors_seen
        return counts

    def totals(self) -> Counts:
        """Everything this process counted since it started."""
        counts = Counts()
        counts.add(self.lifetime)
        counts.add(self.current.counts)
        counts.db_errors += self._db_errors() - self._db_errors_seen
        return counts

    def latency(self, op: str) -> Histogram:
        """Latency of ``op`` since the process started (seconds)."""
        histogram = self.lifetime_latency[op].copy()
        histogram.merge(self.current.latency[op])
        return histogram


def delivery_facts(delivery: Mapping[str, Any]) -> Tuple[int, Optional[float]]:
    """How many messages a pop answer holds and the creation time (Unix seconds) of its
    first one, the oldest of its first partition; without parsing the messages when they
    are still PostgreSQL's text."""
    text = delivery.raw_text if isinstance(delivery, Delivery) else None
    if text is None:
        messages = delivery.get("messages") or []
        first = messages[0].get("createdAt") if messages else None
        return len(messages), _unix_time(first)
    start = text.find(_CREATED_AT)
    if start < 0:
        return text.count(_MESSAGE_END), None
    start += len(_CREATED_AT)
    return text.count(_MESSAGE_END), _unix_time(text[start:text.find('"', start)])


def _unix_time(iso: Any) -> Optional[float]:
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None
