"""Long polls of ephemeral pops: parked in RAM, woken by events, never by polling.

A pop with ``wait=true`` that finds nothing parks here under its queue's name. The engine
calls :meth:`LongPolls.wake` after every push and every redelivery (a failed or retried ack,
an expired lease), and each parked pop of that queue takes what it can, in arrival order.
With a ``windowBuffer`` a pop that got its first message keeps collecting until it has
``count`` messages (or its batch) or ``ms`` have passed, never past its own timeout nor half
the lease of what it holds.
A pop whose client goes away gives its messages back at once, as unseen deliveries; when
the server stops every parked pop is answered with what it holds (usually nothing).
"""

from typing import Dict, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from queen_tw.ephemeral.engine import Delivery, EphemeralEngine


class _Parked:
    """One waiting pop."""

    __slots__ = ("queue", "partition", "group", "batch", "auto_ack", "held", "deferred",
                 "timeout", "window")

    def __init__(self, queue: str, partition: Optional[str], group: str, batch: int,
                 auto_ack: bool, held: List[Delivery]):
        self.queue = queue
        self.partition = partition
        self.group = group
        self.batch = batch
        self.auto_ack = auto_ack
        self.held = held
        self.deferred: defer.Deferred = defer.Deferred()
        self.timeout: Optional[IDelayedCall] = None
        self.window: Optional[IDelayedCall] = None


class LongPolls:
    """The parked pops of one engine (it wakes them through ``engine.on_ready``)."""

    def __init__(self, engine: EphemeralEngine):
        self._engine = engine
        self._clock = engine.clock
        self._parked: Dict[str, List[_Parked]] = {}
        self._stopped = False
        engine.on_ready = self.wake

    def waited_on(self, queue: str) -> bool:
        """Whether a pop is parked on ``queue``."""
        return bool(self._parked.get(queue))

    def pop(self, queue: str, partition: Optional[str], group: str, batch: int,
            auto_ack: bool, wait: bool, timeout_ms: int) -> "defer.Deferred[List[Delivery]]":
        """The deliveries of one pop: at once, or when a wake fills it, or at its timeout
        (then possibly an empty list)."""
        held = self._engine.take(queue, partition, group, batch, auto_ack)
        if not wait or timeout_ms <= 0 or self._stopped or self._ready(queue, batch, held):
            return defer.succeed(held)
        parked = _Parked(queue, partition, group, batch, auto_ack, held)
        parked.deferred = defer.Deferred(lambda _: self._abandon(parked))
        parked.timeout = self._clock.callLater(timeout_ms / 1000.0, self._finish, parked)
        self._parked.setdefault(queue, []).append(parked)
        if held:
            self._open_window(parked)
        return parked.deferred

    def wake(self, queue: str) -> None:
        """Lets the pops parked on ``queue`` take what is there now."""
        for parked in list(self._parked.get(queue, ())):
            if parked.deferred.called:
                continue
            room = parked.batch - len(parked.held)
            got = self._engine.take(queue, parked.partition, parked.group, room,
                                    parked.auto_ack)
            if not got:
                continue
            first = not parked.held
            parked.held.extend(got)
            if self._ready(queue, parked.batch, parked.held):
                self._finish(parked)
            elif first:
                self._open_window(parked)

    def stop(self) -> None:
        """Answers every parked pop with what it holds; later pops answer at once."""
        self._stopped = True
        for waiting in list(self._parked.values()):
            for parked in list(waiting):
                self._finish(parked)

    def _ready(self, queue: str, batch: int, held: List[Delivery]) -> bool:
        """Whether a pop holding ``held`` answers now rather than waiting for more."""
        if not held:
            return False
        if len(held) >= batch:
            return True
        settings = self._engine.queue(queue).settings
        if not settings.windowed:
            return True
        return bool(settings.window_count) and len(held) >= settings.window_count

    def _open_window(self, parked: _Parked) -> None:
        """The first message arrived: answer after the window's ``ms`` (if it has one),
        or earlier on count, batch or the pop's own timeout. Leased messages are held at
        most half their lease, so they reach the client well before the lease runs out."""
        settings = self._engine.queue(parked.queue).settings
        delays = [settings.window_ms / 1000.0] if settings.window_ms else []
        if not parked.auto_ack:
            delays.append(settings.lease_seconds / 2.0)
        if delays:
            parked.window = self._clock.callLater(min(delays), self._finish, parked)

    def _forget(self, parked: _Parked) -> None:
        waiting = self._parked.get(parked.queue)
        if waiting is not None and parked in waiting:
            waiting.remove(parked)
            if not waiting:
                del self._parked[parked.queue]
        for call in (parked.timeout, parked.window):
            if call is not None and call.active():
                call.cancel()

    def _finish(self, parked: _Parked) -> None:
        self._forget(parked)
        if not parked.deferred.called:
            if not parked.auto_ack:  # a reset, delete or drop meanwhile voided some leases
                parked.held = self._engine.still_leased(parked.queue, parked.group,
                                                        parked.held)
            parked.deferred.callback(parked.held)

    def _abandon(self, parked: _Parked) -> None:
        """The client went away (the Deferred was cancelled): what it held goes back."""
        self._forget(parked)
        self._engine.give_back_unseen(parked.queue, parked.group, parked.held)
        parked.held = []
