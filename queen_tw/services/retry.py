"""Retrying with backoff, and logging an outage once instead of at every attempt.

Every loop of the server that waits for something outside it (PostgreSQL to answer, a
LISTEN connection to come back, the replay to find PostgreSQL again) shares two pieces:

- :class:`Backoff`: the delays between attempts (initial, multiplied after each failure,
  capped), back to the initial delay after a success;
- :class:`OutageLog`: one line when a thing starts failing, one when it works again, and in
  between a reminder every ``reminder`` seconds, so an outage of a minute is a handful of
  lines rather than hundreds.

:func:`retry_with_backoff` combines them for "try until it works"; the periodic jobs of
:class:`~queen_tw.services.periodic.PeriodicService` use them between runs.
"""

from dataclasses import dataclass
from typing import Awaitable, Callable, Optional, Tuple, Type, TypeVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

T = TypeVar("T")

REMINDER_S = 30.0
"""Seconds between the "still failing" lines of one outage."""


@dataclass
class Backoff:
    """Delays between attempts: ``initial``, then times ``multiplier`` up to ``maximum``.

    :param initial: seconds before the first retry.
    :param multiplier: growth after each further failure.
    :param maximum: the longest delay.
    """

    initial: float
    multiplier: float = 2.0
    maximum: float = 10.0

    def __post_init__(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        """The delay before the next attempt; the one after it is longer (up to the cap)."""
        delay = self._next
        self._next = min(self._next * self.multiplier, self.maximum)
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits ``initial`` again."""
        self._next = self.initial


class OutageLog:
    """Says when ``what`` stops working, reminds while it stays down, says when it is back.

    :param what: subject of the lines ("PostgreSQL connection", "maintenance flags refresh").
    :param clock: time source for the reminders and the outage's length.
    :param reminder: seconds between reminders while it keeps failing.
    :param logger: where the lines go (the module's logger by default).
    :param quiet_start: failures before the first success are expected (the work needs
        something that is still starting): no line for them unless they last a reminder.
    :param meanwhile: what happens while it fails, for the first line.
    """

    def __init__(self, what: str, clock: IReactorTime, reminder: float = REMINDER_S,
                 logger: Logger = log, quiet_start: bool = False, meanwhile: str = "retrying"):
        self.what = what
        self._meanwhile = meanwhile
        self._clock = clock
        self._reminder = reminder
        self._log = logger
        self._quiet = quiet_start
        self._since: Optional[float] = None
        self._last_line = 0.0
        self._announced = False
        self.failures = 0

    def failed(self, error: str) -> None:
        """An attempt failed with ``error``: logged when it is news or a reminder is due."""
        now = self._clock.seconds()
        self.failures += 1
        if self._since is None:
            self._since = self._last_line = now
            if not self._quiet:
                self._announced = True
                self._log.warn("{what} failing: {error}; {meanwhile}", what=self.what,
                               error=error, meanwhile=self._meanwhile)
        elif now - self._last_line >= self._reminder:
            self._last_line = now
            self._announced = True
            self._log.warn("{what} still failing after {seconds:.0f}s ({attempts} attempts): "
                           "{error}", what=self.what, seconds=now - self._since,
                           attempts=self.failures, error=error)

    def succeeded(self) -> None:
        """An attempt worked: logged only when it ends an outage."""
        if self._announced and self._since is not None:
            self._log.info("{what} working again after {seconds:.0f}s", what=self.what,
                           seconds=self._clock.seconds() - self._since)
        self._since = None
        self._announced = self._quiet = False
        self.failures = 0


async def retry_with_backoff(attempt: Callable[[], Awaitable[T]], clock: IReactorTime,
                             backoff: Backoff, outage: OutageLog,
                             keep_trying: Callable[[], bool] = lambda: True,
                             give_up_on: Tuple[Type[BaseException], ...] = ()) -> T:
    """Runs ``attempt`` until it returns, waiting ``backoff`` between failures.

    :param attempt: the coroutine function to try.
    :param clock: time source of the waits.
    :param backoff: the delays (reset once it works).
    :param outage: reports the failures (one line per change, then reminders).
    :param keep_trying: asked before every attempt; False ends the loop with
        ``CancelledError`` (the owner is stopping).
    :param give_up_on: errors that retrying cannot fix: raised at once.

    Cancelling the returned coroutine's Deferred stops a wait in progress.
    """
    while True:
        if not keep_trying():
            raise defer.CancelledError(f"stopped retrying: {outage.what}")
        try:
            result = await attempt()
        except give_up_on:
            raise
        except defer.CancelledError:
            raise
        except Exception as err:
            outage.failed(describe_error(err))
            await task.deferLater(clock, backoff.next_delay(), lambda: None)
            continue
        outage.succeeded()
        backoff.reset()
        return result


def describe_error(error: BaseException) -> str:
    """The first line of an error's message (its class name when it has none); of the
    error inside, for a ``DeferredList``'s ``FirstError`` (whose own text is the failure's
    repr, "Failure instance: Traceback: …", read as a traceback in the log)."""
    if isinstance(error, defer.FirstError) and error.subFailure.value is not None:
        error = error.subFailure.value
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__
