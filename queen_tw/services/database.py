"""Getting PostgreSQL ready: install or upgrade the schema, then open the pool.

PostgreSQL may start after the server (a machine booting, a container restarting), so both
services here retry with backoff until it answers, logging the outage once rather than at
every attempt. A schema upgrade that failed (``SchemaUpgradeError``: it rolled back and
retrying will not fix it) is different: the process says so in one line and exits with
status 1, so a supervisor and the operator see it at once.
"""

from contextlib import closing
from pathlib import Path
from typing import Callable, List, Optional

import psycopg2
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from queen_tw.crypto import PayloadCipher, key_check
from queen_tw.db.pool import Database
from queen_tw.db.schema import SchemaUpgradeError, install_schema
from queen_tw.paths import sql_dir
from queen_tw.services.retry import Backoff, OutageLog, retry_with_backoff
from queen_tw.startup import fatal

log = Logger()

Installer = Callable[[str, Path], List[str]]


def _connect_backoff() -> Backoff:
    return Backoff(0.5, multiplier=2.0, maximum=10.0)


class _SchemaService(service.Service):
    """Installs the schema in a thread, retried until PostgreSQL answers; ``fatal`` on a
    failed upgrade.

    :param dsn: where the schema goes.
    :param reactor: clock of the retries, and what :func:`~queen_tw.startup.fatal` stops.
    :param install: the blocking installer (``install_schema``).
    """

    def __init__(self, dsn: str, reactor, install: Installer = install_schema):
        self._dsn = dsn
        self._reactor = reactor
        self._install = install
        self._outage = OutageLog("PostgreSQL connection", reactor)
        self._work: Optional[defer.Deferred] = None
        self._first_attempt_over = False
        self._first_attempt_waiters: List[defer.Deferred] = []

    def startService(self) -> None:
        super().startService()
        self._work = defer.ensureDeferred(retry_with_backoff(
            self._attempt, self._reactor, _connect_backoff(), self._outage,
            keep_trying=lambda: bool(self.running),
            give_up_on=(SchemaUpgradeError, EncryptionKeyMismatch)))
        self._work.addCallbacks(self._ready, self._refused)

    def stopService(self):
        super().stopService()
        if self._work is not None and not self._work.called:
            self._work.cancel()

    def first_attempt_ended(self) -> defer.Deferred:
        """Fires (with None) once the first attempt has connected or failed: a worker of a
        NUM_WORKERS group takes its share of the connections only then (see
        :func:`queen_tw.listening.http_listener`)."""
        if self._first_attempt_over:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        self._first_attempt_waiters.append(waiter)
        return waiter

    async def _attempt(self) -> None:
        try:
            applied = await threads.deferToThread(self._install, self._dsn, sql_dir())
            if applied:
                log.info("schema files applied: {files}", files=", ".join(applied))
            await self._after_install()
        finally:
            self._end_first_attempt()

    def _end_first_attempt(self) -> None:
        if self._first_attempt_over:
            return
        self._first_attempt_over = True
        waiters, self._first_attempt_waiters = self._first_attempt_waiters, []
        for waiter in waiters:
            waiter.callback(None)  # a no-op on one cancelled by a stop

    async def _after_install(self) -> None:
        """What follows a successful installation, inside the same retried attempt."""

    def _ready(self, _: None) -> None:
        """Everything worked."""

    def _refused(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return  # stopped before PostgreSQL answered
        if failure.check(SchemaUpgradeError, EncryptionKeyMismatch):
            fatal(self._reactor, str(failure.value))
            return
        log.failure("preparing PostgreSQL failed", failure)


class EncryptionKeyMismatch(Exception):
    """The database recorded another QUEEN_ENCRYPTION_KEY."""


_KEY_CHANGE = ("to change the key, stop every instance, delete the record (DELETE FROM "
               "queen.system_state WHERE key = 'encryption_key_check') and start them all "
               "with the new key")


def check_encryption_key(dsn: str, digest: str, cipher: PayloadCipher) -> None:
    """Compares this server's key digest (``crypto.key_check``) with the database's
    (blocking; recording it when it is the first). Raises :class:`EncryptionKeyMismatch` for
    another key: with encrypted payloads stored it could not read them, and without,
    instances with the recorded key may be running and would seal payloads this one could
    not open.

    A database with encrypted payloads and no digest (written by a release from before the
    check) is recorded only once ``cipher`` opens one of them: recording whichever key came
    first would lock the right one out."""
    with closing(psycopg2.connect(dsn)) as connection, connection, connection.cursor() as cursor:
        cursor.execute("SELECT queen.encryption_key_check(%s, false)", (digest,))
        [(verdict,)] = cursor.fetchall()
        if verdict == "unverified":
            cursor.execute("SELECT queen.encrypted_payload_sample()")
            [(sample,)] = cursor.fetchall()
            verdict = "mismatch"
            if sample is None or cipher.opens(sample):
                cursor.execute("SELECT queen.encryption_key_check(%s, true)", (digest,))
                [(verdict,)] = cursor.fetchall()
    if verdict == "mismatch":
        raise EncryptionKeyMismatch(
            "QUEEN_ENCRYPTION_KEY is not the key this database's encrypted payloads were "
            "written with: start with that key (payloads are never re-encrypted)")
    if verdict == "differs":
        raise EncryptionKeyMismatch(
            "QUEEN_ENCRYPTION_KEY is not the key recorded for this database (nothing "
            f"encrypted is stored yet, but instances with that key may run); {_KEY_CHANGE}")


class DatabaseService(_SchemaService):
    """Installs the schema and opens the pool, retrying with backoff until PostgreSQL answers.

    The HTTP listener does not wait for it: until the pool is open every database call fails
    fast with 503 and ``/health`` says ``unhealthy``. Stopping closes the pool.

    :param encryption_key: QUEEN_ENCRYPTION_KEY, None without one. Before the pool opens
        its digest (``crypto.key_check``) is compared with the one the database recorded
        (:func:`check_encryption_key`); another key stops the server (status 1).
    """

    def __init__(self, dsn: str, db: Database, reactor, install: Installer = install_schema,
                 encryption_key: Optional[bytes] = None):
        super().__init__(dsn, reactor, install)
        self._db = db
        self._key = encryption_key

    async def _after_install(self) -> None:
        if self._key is not None:  # before any request can use the pool
            await threads.deferToThread(check_encryption_key, self._dsn, key_check(self._key),
                                        PayloadCipher(self._key))
        await self._db.connect()
        log.info("connected to PostgreSQL with {n} connections", n=self._db.size)

    def stopService(self):
        super().stopService()
        self._db.close()


class MigrationService(_SchemaService):
    """``--migrate-only``: installs or upgrades the schema, then ends the process (status 0).

    Retries until PostgreSQL answers like the server does; a failed upgrade ends it with
    status 1 and its one-line reason.
    """

    def _ready(self, _: None) -> None:
        log.info("schema is up to date; --migrate-only: stopping")
        self._reactor.stop()
