"""One (queue, partition) of an ephemeral queue: its messages in push order and the cursor
of every consumer group over them.

Messages are numbered by a sequence that only grows (``head`` is the number of the oldest
one kept, ``tail`` the next to be given), so a message is found by subtraction. Each group
has its own :class:`Cursor`: the next number it has not been handed, the numbers waiting to be
handed again (an expired lease, a failed ack), the leases it holds and how many deliveries
each of its messages has had. The ring keeps a message until every group is past it (or a
bound, the TTL or a reset drops it); nothing here knows about time or budgets, the engine
does.
"""

import bisect
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

QUEUE_MODE = "__QUEUE_MODE__"
"""The group of a pop that names none: one shared cursor, as on durable queues."""


class Cursor:
    """One consumer group's position in one ring."""

    __slots__ = ("next", "redeliver", "leased", "attempts", "skipped")

    def __init__(self, start: int):
        self.next = start
        self.redeliver: List[int] = []  # sorted: redeliveries keep push order
        self.leased: Dict[int, int] = {}  # sequence -> token of the lease holding it
        self.attempts: Dict[int, int] = {}  # sequence -> deliveries so far (in flight only)
        self.skipped = 0  # messages dropped (bounds, TTL) before this group was handed them

    def low_water(self) -> int:
        """The lowest sequence this group may still be handed or still holds."""
        low = self.next
        if self.redeliver:
            low = min(low, self.redeliver[0])
        if self.leased:
            low = min(low, min(self.leased))
        return low


class Ring:
    """The messages of one partition and its groups' cursors.

    :param start: the first sequence number; the engine gives every ring of an incarnation
        its own range, so a sequence never names two messages.
    """

    __slots__ = ("messages", "head", "tail", "bytes", "cursors")

    def __init__(self, start: int, groups: Tuple[str, ...] = ()):
        self.messages: Deque[Tuple[bytes, float]] = deque()  # (payload JSON, pushed at)
        self.head = start
        self.tail = start
        self.bytes = 0
        self.cursors: Dict[str, Cursor] = {group: Cursor(start) for group in groups}

    def __len__(self) -> int:
        return len(self.messages)

    def append(self, payloads: List[bytes], size: int, now: float) -> None:
        """Adds messages at the tail; ``size`` is their total length."""
        self.messages.extend((payload, now) for payload in payloads)
        self.tail += len(payloads)
        self.bytes += size

    def cursor(self, group: str) -> Cursor:
        """The group's cursor; a new group starts at the oldest message kept."""
        cursor = self.cursors.get(group)
        if cursor is None:
            cursor = self.cursors[group] = Cursor(self.head)
        return cursor

    def payload(self, sequence: int) -> bytes:
        """The payload of a kept message (``head <= sequence < tail``)."""
        return self.messages[sequence - self.head][0]

    def next_for(self, cursor: Cursor, count: int) -> List[int]:
        """Up to ``count`` sequences to hand the group now, redeliveries first; moves the
        cursor past them (the caller leases them or forgets them)."""
        taken: List[int] = []
        if cursor.redeliver:
            taken = cursor.redeliver[:count]
            del cursor.redeliver[:count]
        start = max(cursor.next, self.head)
        fresh = min(count - len(taken), self.tail - start)
        if fresh > 0:
            taken.extend(range(start, start + fresh))
            cursor.next = start + fresh
        return taken

    def redeliver(self, cursor: Cursor, sequence: int) -> None:
        """Puts ``sequence`` back for the group, in push order."""
        bisect.insort(cursor.redeliver, sequence)

    def drop_oldest(self) -> Tuple[int, int]:
        """Drops the oldest message whatever the groups did with it: every group not yet
        past it counts a skip, a lease on it is void. Returns (1, bytes), or (0, 0) when
        empty."""
        if not self.messages:
            return 0, 0
        payload, _ = self.messages.popleft()
        sequence = self.head
        self.head += 1
        self.bytes -= len(payload)
        for cursor in self.cursors.values():
            waiting = cursor.redeliver and cursor.redeliver[0] == sequence
            if cursor.next <= sequence or waiting:
                cursor.skipped += 1
            if cursor.next <= sequence:
                cursor.next = sequence + 1
            if waiting:
                del cursor.redeliver[0]
            cursor.leased.pop(sequence, None)
            cursor.attempts.pop(sequence, None)
        return 1, len(payload)

    def drop_older_than(self, cutoff: float) -> Tuple[int, int]:
        """Drops the messages pushed before ``cutoff`` (they are a prefix). Returns
        (count, bytes)."""
        count = size = 0
        while self.messages and self.messages[0][1] < cutoff:
            dropped, freed = self.drop_oldest()
            count += dropped
            size += freed
        return count, size

    def trim_consumed(self) -> Tuple[int, int]:
        """Forgets the messages every group is done with. With no group yet nothing is
        done with: the messages wait for their first consumer. Returns (count, bytes)."""
        if not self.cursors:
            return 0, 0
        floor = min(cursor.low_water() for cursor in self.cursors.values())
        count = size = 0
        while self.messages and self.head < floor:
            payload, _ = self.messages.popleft()
            self.head += 1
            count += 1
            size += len(payload)
        self.bytes -= size
        return count, size

    def wipe(self) -> int:
        """Drops every message, voids every lease and puts every cursor at the tail
        (``reset``). Returns how many messages were dropped."""
        dropped = len(self.messages)
        self.messages.clear()
        self.head = self.tail
        self.bytes = 0
        for cursor in self.cursors.values():
            cursor.next = self.tail
            cursor.redeliver.clear()
            cursor.leased.clear()
            cursor.attempts.clear()
        return dropped

    def pending(self, cursor: Cursor) -> int:
        """Messages the group could still be handed (leased ones are not pending)."""
        fresh = self.tail - max(cursor.next, self.head)
        return fresh + len(cursor.redeliver)

    def pending_for(self, group: Optional[str]) -> int:
        """The backlog a depth read reports: the named group's; without a group the
        slowest named group's, else the queue-mode cursor's, else every message kept."""
        if group is not None:
            cursor = self.cursors.get(group)
            return self.pending(cursor) if cursor is not None else len(self.messages)
        named = [self.pending(cursor) for name, cursor in self.cursors.items()
                 if name != QUEUE_MODE]
        if named:
            return max(named)
        cursor = self.cursors.get(QUEUE_MODE)
        return self.pending(cursor) if cursor is not None else len(self.messages)
