"""The ephemeral engine (WIRE2.md 7): every ephemeral queue of this process, in RAM.

A queue holds one :class:`~queen_tw.ephemeral.ring.Ring` per partition. A push appends to
one ring, all or nothing: the queue's bounds (``maxBytes``/``maxLength``, with policy
``reject`` or ``dropOldest``) and the broker-wide byte budget are checked before anything
changes. A pop hands a group the next messages of its cursor; unless it commits at delivery
(``autoAck``) it leases them for the queue's ``leaseSeconds``. Leases expire on one reactor
timer, set for the earliest deadline: an expired or failed delivery comes back with
``attempts`` + 1 until ``retryLimit`` redeliveries, then it is dropped and counted.

Message ids are ``e:<epoch>:<partition>:<sequence>``; the epoch is drawn at start, so an ack
of an id minted before a restart answers ``stale``. Nothing here reads PostgreSQL or a
request; time comes from the injected ``IReactorTime``.
"""

import bisect
import heapq
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from queen_tw.ephemeral.errors import NoRoom, QueueFull, QueueNotFound
from queen_tw.ephemeral.options import Defaults, Settings, settings_of
from queen_tw.ephemeral.ring import QUEUE_MODE, Cursor, Ring

DEFAULT_PARTITION = "Default"

ACK_STATUSES = ("completed", "failed", "retry")

_RING_SPAN = 1 << 48
"""Sequence numbers reserved per ring: every ring of an incarnation numbers from its own
base, so an id never names a message of a ring that was deleted and made again."""


@dataclass(frozen=True)
class Delivery:
    """One message handed to a pop."""

    id: str
    partition: str
    attempts: int
    payload: bytes  # the payload as JSON text, exactly as stored at push


class EphemeralQueue:
    """One queue: its rings, its settings and its counters."""

    def __init__(self, name: str, settings: Settings, declared: bool,
                 options: Optional[Dict[str, Any]] = None):
        self.name = name
        self.settings = settings
        self.declared = declared
        self.options: Dict[str, Any] = options or {}
        self.rings: Dict[str, Ring] = {}
        # every group that popped, with its last pop or ack: new rings start a cursor for
        # each; an idle one is forgotten (see EphemeralEngine.forget_idle)
        self.groups: Dict[str, float] = {}
        # per group, the partition a pop without one tries first: the one after the partition
        # that served the group's last such pop (a busy partition never starves the others)
        self.turns: Dict[str, str] = {}
        self.bytes = 0
        self.length = 0
        self.drops = {"bounds": 0, "ttl": 0, "retry": 0}
        self.used_at = 0.0  # last push, pop or ack: idle implicit queues are forgotten


def _oldest_first(queue: EphemeralQueue, pushed_to: Ring) -> Iterator[Ring]:
    """The ring of each message a ``dropOldest`` push may drop, in the order it drops them:
    the partition pushed to, oldest first, then the queue's other partitions, oldest first
    across them (a partition that floods the queue eats its own backlog before the others')."""
    for _ in pushed_to.messages:
        yield pushed_to
    others = [ring for ring in queue.rings.values() if ring is not pushed_to]
    ages = [[(at, n) for _, at in ring.messages] for n, ring in enumerate(others)]
    for _, n in heapq.merge(*ages):
        yield others[n]


def _held_by(queue: EphemeralQueue, group: str, delivery: Delivery
             ) -> Optional[Tuple[Ring, Cursor, int]]:
    """The ring, the group's cursor and the sequence a delivery of ``queue`` names (None
    when its id is not one of ours or its ring or cursor is gone)."""
    parsed = parse_id(delivery.id)
    ring = queue.rings.get(delivery.partition)
    cursor = ring.cursors.get(group) if ring is not None else None
    if parsed is None or ring is None or cursor is None:
        return None
    return ring, cursor, parsed[2]


def _in_turn(names: List[str], last: Optional[str]) -> List[str]:
    """``names`` (sorted) rotated to start after ``last``."""
    start = bisect.bisect_right(names, last) if last is not None else 0
    return names[start:] + names[:start]


def mint_id(epoch: int, partition: str, sequence: int) -> str:
    """The opaque id of a message."""
    return f"e:{epoch:x}:{partition}:{sequence}"


def parse_id(text: Any) -> Optional[Tuple[int, str, int]]:
    """(epoch, partition, sequence) of an id, or None; read from both ends because a
    partition name may contain ``:``."""
    if not isinstance(text, str) or not text.startswith("e:"):
        return None
    epoch_hex, _, rest = text[2:].partition(":")
    partition, _, sequence = rest.rpartition(":")
    if not partition or not sequence.isdigit() or not epoch_hex:
        return None
    try:
        return int(epoch_hex, 16), partition, int(sequence)
    except ValueError:
        return None


class EphemeralEngine:
    """Every ephemeral queue of this process.

    :param clock: time and timers (a ``task.Clock`` in unit tests).
    :param defaults: the broker's defaults and byte budget.
    :param epoch: this incarnation's number (random when omitted).
    """

    def __init__(self, clock: IReactorTime, defaults: Optional[Defaults] = None,
                 epoch: Optional[int] = None):
        self.clock = clock
        self.defaults = defaults or Defaults()
        self.epoch = epoch if epoch is not None else secrets.randbits(48)
        self.queues: Dict[str, EphemeralQueue] = {}
        self.bytes = 0  # over every queue, against defaults.max_bytes
        self.on_ready: Callable[[str], None] = lambda queue: None  # set by the long polls
        self._next_base = 0
        self._lease_token = 0
        self._leases: List[Tuple[float, int, str, str, str, Tuple[int, ...]]] = []
        self._leases_kept = 0  # heap size after the last compaction
        self._lease_timer: Optional[IDelayedCall] = None

    # -- queues and declarations ------------------------------------------------------

    def queue(self, name: str) -> EphemeralQueue:
        """The queue, made implicitly (with the defaults) when it does not exist."""
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = EphemeralQueue(
                name, settings_of({}, self.defaults), declared=False)
        queue.used_at = self.clock.seconds()
        return queue

    def declare(self, name: str, options: Dict[str, Any]) -> None:
        """Applies stored options to the queue (made if needed); its contents stay."""
        queue = self.queue(name)
        queue.declared = True
        queue.options = options
        queue.settings = settings_of(options, self.defaults)

    def undeclare(self, name: str) -> None:
        """The queue's declaration is gone (deleted elsewhere): it stays, as implicit."""
        queue = self.queues.get(name)
        if queue is not None:
            queue.declared = False
            queue.options = {}
            queue.settings = settings_of({}, self.defaults)

    def remove(self, name: str) -> bool:
        """Drops the queue, its rings and leases; True when it existed here."""
        queue = self.queues.pop(name, None)
        if queue is None:
            return False
        self.bytes -= queue.bytes
        return True

    def reset(self, name: str) -> int:
        """Drops every message, voids every lease and puts every cursor at the tail; the
        declaration stays. Returns how many messages were dropped (0 for no queue)."""
        queue = self.queues.get(name)
        if queue is None:
            return 0
        dropped = sum(ring.wipe() for ring in queue.rings.values())
        self.bytes -= queue.bytes
        queue.bytes = queue.length = 0
        return dropped

    def _ring(self, queue: EphemeralQueue, partition: str) -> Ring:
        ring = queue.rings.get(partition)
        if ring is None:
            ring = queue.rings[partition] = Ring(self._next_base, tuple(queue.groups))
            self._next_base += _RING_SPAN
        return ring

    def _freed(self, queue: EphemeralQueue, count: int, size: int) -> None:
        queue.length -= count
        queue.bytes -= size
        self.bytes -= size

    # -- push ---------------------------------------------------------------------------

    def push(self, name: str, partition: str, payloads: List[bytes]) -> int:
        """Appends ``payloads`` (JSON texts) to one partition, all or nothing.

        Raises :class:`QueueFull` (policy reject, or a batch larger than the queue's bounds)
        or :class:`NoRoom` (the broker-wide budget) with nothing changed.
        """
        if not payloads:
            return 0
        queue = self.queue(name)
        ring = self._ring(queue, partition)
        self._tidy(queue, ring)
        size = sum(len(payload) for payload in payloads)
        evict = self._evictions_needed(queue, ring, len(payloads), size)
        budget = self.defaults.max_bytes
        freed = sum(len(victim.messages[i][0])
                    for victim, count in evict.items() for i in range(count))
        if budget and self.bytes - freed + size > budget:
            raise NoRoom(f"this server's ephemeral queues hold {self.bytes} bytes and "
                         f"QUEEN_EPHEMERAL_MAX_BYTES is {budget}")
        for victim, count in evict.items():
            for _ in range(count):
                self._freed(queue, *victim.drop_oldest())
            queue.drops["bounds"] += count
        ring.append(payloads, size, self.clock.seconds())
        queue.length += len(payloads)
        queue.bytes += size
        self.bytes += size
        self.on_ready(name)
        return len(payloads)

    def _evictions_needed(self, queue: EphemeralQueue, ring: Ring, count: int,
                          size: int) -> Dict[Ring, int]:
        """How many of each ring's oldest messages must go for the push to ``ring`` to fit
        the queue's bounds (empty when it fits); raises QueueFull when it cannot fit."""
        settings = queue.settings
        if (queue.length + count <= settings.max_length
                and queue.bytes + size <= settings.max_bytes):
            return {}
        if settings.policy == "reject":
            raise QueueFull(f"the ephemeral queue {queue.name!r} is at its maxBytes "
                            f"({settings.max_bytes}) / maxLength ({settings.max_length}) "
                            "and its policy is reject")
        length, held = queue.length, queue.bytes
        evict: Dict[Ring, int] = {}
        victims = _oldest_first(queue, ring)
        while length + count > settings.max_length or held + size > settings.max_bytes:
            victim = next(victims, None)
            if victim is None:
                raise QueueFull(f"this push ({count} messages, {size} bytes) does not fit "
                                f"the bounds of the ephemeral queue {queue.name!r} even "
                                "after dropping its oldest messages")
            held -= len(victim.messages[evict.get(victim, 0)][0])
            length -= 1
            evict[victim] = evict.get(victim, 0) + 1
        return evict

    def _tidy(self, queue: EphemeralQueue, ring: Ring) -> None:
        """Drops what the TTL says is too old and forgets what every group consumed."""
        ttl = queue.settings.ttl_seconds
        if ttl:
            count, size = ring.drop_older_than(self.clock.seconds() - ttl)
            queue.drops["ttl"] += count
            self._freed(queue, count, size)
        self._freed(queue, *ring.trim_consumed())

    def sweep_ttl(self) -> int:
        """Applies every queue's TTL now (the periodic sweep); returns the drops."""
        dropped = 0
        for queue in list(self.queues.values()):
            if queue.settings.ttl_seconds:
                before = queue.drops["ttl"]
                for ring in queue.rings.values():
                    self._tidy(queue, ring)
                dropped += queue.drops["ttl"] - before
        return dropped

    def forget_idle(self, idle_seconds: float, waited_on: Callable[[str], bool]) -> int:
        """Forgets implicit queues that hold nothing, had no push, pop or ack for
        ``idle_seconds`` and have no parked pop (``waited_on``): a request-reply inbox
        per client would otherwise keep its name and cursors forever. Declared queues stay.
        Also forgets, in queues without a parked pop, every group with no pop or ack for
        ``idle_seconds`` and no lease held: a group per subscriber would otherwise keep a
        cursor in every ring forever, and every push and pop pays for each cursor. A group
        that comes back starts again as a new one. Returns how many queues were forgotten."""
        cutoff = self.clock.seconds() - idle_seconds
        idle = [name for name, queue in self.queues.items()
                if not queue.declared and queue.length == 0 and queue.used_at <= cutoff
                and not waited_on(name)]
        for name in idle:
            self.remove(name)
        for name, queue in self.queues.items():
            if not waited_on(name):
                self._forget_idle_groups(queue, cutoff)
        return len(idle)

    def _forget_idle_groups(self, queue: EphemeralQueue, cutoff: float) -> None:
        gone = [group for group, used_at in queue.groups.items() if used_at <= cutoff
                and not any(ring.cursors[group].leased for ring in queue.rings.values()
                            if group in ring.cursors)]
        for group in gone:
            del queue.groups[group]
            queue.turns.pop(group, None)
            for ring in queue.rings.values():
                ring.cursors.pop(group, None)
        if gone:
            for ring in queue.rings.values():
                self._freed(queue, *ring.trim_consumed())

    # -- pop ----------------------------------------------------------------------------

    def take(self, name: str, partition: Optional[str], group: str, count: int,
             auto_ack: bool) -> List[Delivery]:
        """Up to ``count`` messages for ``group``: from one partition, or from every
        partition in name order, starting after the one that served the group's previous
        pop without a partition. Leased for the queue's ``leaseSeconds`` unless
        ``auto_ack`` (then the group is past them at once). Never waits."""
        queue = self.queue(name)
        if group not in queue.groups:
            for ring in queue.rings.values():
                ring.cursor(group)
        queue.groups[group] = self.clock.seconds()
        if partition is not None:
            if partition not in queue.rings:  # a pop makes no ring: names cost memory
                return []
            names: Iterable[str] = (partition,)
        else:
            names = _in_turn(sorted(queue.rings), queue.turns.get(group))
        out: List[Delivery] = []
        for ring_name in names:
            if len(out) >= count:
                break
            out.extend(self._take_from(queue, ring_name, group, count - len(out), auto_ack))
        if partition is None and out:
            queue.turns[group] = out[0].partition
        return out

    def _take_from(self, queue: EphemeralQueue, partition: str, group: str, count: int,
                   auto_ack: bool) -> List[Delivery]:
        ring = queue.rings[partition]
        self._tidy(queue, ring)
        cursor = ring.cursor(group)
        sequences = ring.next_for(cursor, count)
        if not sequences:
            return []
        if not auto_ack:
            self._lease(queue, partition, group, cursor, sequences)
        out = []
        for sequence in sequences:
            attempts = cursor.attempts.get(sequence, 0) + 1
            if auto_ack:
                cursor.attempts.pop(sequence, None)
            else:
                cursor.attempts[sequence] = attempts
            out.append(Delivery(mint_id(self.epoch, partition, sequence), partition,
                                attempts, ring.payload(sequence)))
        if auto_ack:
            self._freed(queue, *ring.trim_consumed())
        return out

    # -- leases -------------------------------------------------------------------------

    def _lease(self, queue: EphemeralQueue, partition: str, group: str, cursor: Cursor,
               sequences: List[int]) -> None:
        """Leases a pop's sequences to ``group`` under one new token; one timer serves the
        earliest deadline. The cursor is marked before the heap may be compacted, which
        keeps only the entries some cursor still holds."""
        self._lease_token += 1
        for sequence in sequences:
            cursor.leased[sequence] = self._lease_token
        deadline = self.clock.seconds() + queue.settings.lease_seconds
        heapq.heappush(self._leases, (deadline, self._lease_token, queue.name, partition,
                                      group, tuple(sequences)))
        if len(self._leases) > max(1024, 2 * self._leases_kept):
            self._compact_leases()
        if self._lease_timer is None or deadline < self._lease_timer.getTime():
            self._arm_lease_timer()

    def _compact_leases(self) -> None:
        """Drops the heap entries whose messages were all acked (or reset, or dropped)
        already: under steady acking the heap would otherwise hold every pop of the last
        lease period. Amortised: it runs when the heap has doubled since the last time."""
        def live(entry: Tuple[float, int, str, str, str, Tuple[int, ...]]) -> bool:
            _, token, name, partition, group, sequences = entry
            queue = self.queues.get(name)
            ring = queue.rings.get(partition) if queue is not None else None
            cursor = ring.cursors.get(group) if ring is not None else None
            return cursor is not None and any(
                cursor.leased.get(sequence) == token for sequence in sequences)
        self._leases = [entry for entry in self._leases if live(entry)]
        heapq.heapify(self._leases)
        self._leases_kept = len(self._leases)

    def _arm_lease_timer(self) -> None:
        if self._lease_timer is not None and self._lease_timer.active():
            self._lease_timer.cancel()
        self._lease_timer = None
        if self._leases:
            delay = max(0.0, self._leases[0][0] - self.clock.seconds())
            self._lease_timer = self.clock.callLater(delay, self._expire_leases)

    def _expire_leases(self) -> None:
        """Every lease past its deadline gives its messages back (or drops them)."""
        self._lease_timer = None
        now = self.clock.seconds()
        woken = set()
        while self._leases and self._leases[0][0] <= now:
            _, token, name, partition, group, sequences = heapq.heappop(self._leases)
            queue = self.queues.get(name)
            ring = queue.rings.get(partition) if queue is not None else None
            if queue is None or ring is None:
                continue
            cursor = ring.cursors.get(group)
            if cursor is None:
                continue
            for sequence in sequences:
                if cursor.leased.get(sequence) == token:
                    del cursor.leased[sequence]
                    if self._give_back(queue, ring, cursor, sequence):
                        woken.add(name)
            self._freed(queue, *ring.trim_consumed())
        self._arm_lease_timer()
        for name in woken:
            self.on_ready(name)

    def _give_back(self, queue: EphemeralQueue, ring: Ring, cursor: Cursor,
                   sequence: int) -> bool:
        """A delivery failed (expired lease, failed/retry ack): redeliver it, or drop it
        once it had ``retryLimit`` redeliveries. True when it will be redelivered."""
        attempts = cursor.attempts.get(sequence, 1)
        if attempts > queue.settings.retry_limit:
            cursor.attempts.pop(sequence, None)
            queue.drops["retry"] += 1
            return False
        ring.redeliver(cursor, sequence)
        return True

    def still_leased(self, name: str, group: str, deliveries: List[Delivery]
                     ) -> List[Delivery]:
        """The leased ``deliveries`` whose lease still holds: a reset, delete, ``dropOldest``
        or TTL drop ended the others while a window held them, and their messages are gone."""
        queue = self.queues.get(name)
        if queue is None:
            return []
        kept = []
        for delivery in deliveries:
            held = _held_by(queue, group, delivery)
            if held is not None and held[2] in held[1].leased:
                kept.append(delivery)
        return kept

    def give_back_unseen(self, name: str, group: str, deliveries: List[Delivery]) -> None:
        """Deliveries that never reached their client (it went away while its pop waited):
        their leases end now and they come back without counting an attempt. Committed
        ones (autoAck) are gone: that is at-most-once."""
        queue = self.queues.get(name)
        if queue is None or not deliveries:
            return
        returned = False
        for delivery in deliveries:
            held = _held_by(queue, group, delivery)
            if held is None:
                continue
            ring, cursor, sequence = held
            if cursor.leased.pop(sequence, None) is None:
                continue
            cursor.attempts[sequence] = cursor.attempts.get(sequence, 1) - 1
            ring.redeliver(cursor, sequence)
            returned = True
        if returned:
            self.on_ready(name)

    # -- ack ----------------------------------------------------------------------------

    def ack(self, name: str, group: str, acks: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """Settles each (id, status) for ``group``; answers (id, outcome) with outcome
        ``acked``, ``redelivered``, ``stale`` (an id of an earlier incarnation) or
        ``unknown`` (no live lease of this group on it)."""
        queue = self.queues.get(name)
        if queue is not None:
            queue.used_at = self.clock.seconds()
            if group in queue.groups:
                queue.groups[group] = queue.used_at
        results = []
        touched: Set[Ring] = set()
        redelivered = False
        for message_id, status in acks:
            outcome = self._ack_one(queue, group, message_id, status, touched)
            redelivered = redelivered or outcome == "redelivered"
            results.append((message_id, outcome))
        if queue is not None:
            for ring in touched:
                self._freed(queue, *ring.trim_consumed())
        if redelivered:
            self.on_ready(name)
        return results

    def _ack_one(self, queue: Optional[EphemeralQueue], group: str, message_id: str,
                 status: str, touched: Set[Ring]) -> str:
        parsed = parse_id(message_id)
        if parsed is None:
            return "unknown"
        epoch, partition, sequence = parsed
        if epoch != self.epoch:
            return "stale"
        ring = queue.rings.get(partition) if queue is not None else None
        cursor = ring.cursors.get(group) if ring is not None else None
        if queue is None or ring is None or cursor is None:
            return "unknown"
        if cursor.leased.pop(sequence, None) is None:
            return "unknown"
        touched.add(ring)
        if status == "completed" or not self._give_back(queue, ring, cursor, sequence):
            cursor.attempts.pop(sequence, None)
            return "acked"
        return "redelivered"

    # -- status -------------------------------------------------------------------------

    def listing(self) -> List[Dict[str, Any]]:
        """Every queue with its gauges and effective options (``GET .../queues``)."""
        rows = []
        for name in sorted(self.queues):
            queue = self.queues[name]
            rows.append({
                "queue": name, "tier": "declared" if queue.declared else "implicit",
                "depth": sum(ring.pending_for(None) for ring in queue.rings.values()),
                "bytes": queue.bytes, "partitions": len(queue.rings),
                "groups": len(queue.groups), "drops": dict(queue.drops),
                "options": queue.settings.as_options()})
        return rows

    def depth(self, name: str, group: Optional[str]) -> Dict[str, Any]:
        """One queue's backlog per partition and per group; raises QueueNotFound."""
        queue = self.queues.get(name)
        if queue is None:
            raise QueueNotFound(f"no ephemeral queue {name!r} exists on this server")
        for ring in queue.rings.values():
            self._tidy(queue, ring)
        partitions = [{"partition": partition, "pending": ring.pending_for(group),
                       "bytes": ring.bytes} for partition, ring in sorted(queue.rings.items())]
        groups = []
        for group_name in sorted(queue.groups):
            cursors = [(ring, ring.cursors[group_name]) for ring in queue.rings.values()
                       if group_name in ring.cursors]
            groups.append({"group": group_name,
                           "pending": sum(ring.pending(cursor) for ring, cursor in cursors),
                           "skipped": sum(cursor.skipped for _, cursor in cursors)})
        return {"queue": name, "group": group,
                "tier": "declared" if queue.declared else "implicit",
                "pending": sum(row["pending"] for row in partitions),
                "partitionsPending": sum(1 for row in partitions if row["pending"]),
                "bytes": queue.bytes, "partitions": partitions, "groups": groups}

    def stop(self) -> None:
        """Cancels the lease timer (the process is stopping; contents die with it)."""
        if self._lease_timer is not None and self._lease_timer.active():
            self._lease_timer.cancel()
        self._lease_timer = None


__all__ = ["ACK_STATUSES", "DEFAULT_PARTITION", "Delivery", "EphemeralEngine", "QUEUE_MODE",
           "mint_id", "parse_id"]
