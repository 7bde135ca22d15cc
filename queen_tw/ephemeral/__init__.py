"""Ephemeral queues (WIRE2.md 7): RAM-only rings served by this process alone.

Contents survive nothing (restart, crash); only a queue's declared options are stored in
PostgreSQL, so a declared queue comes back declared and empty. Push, pop and ack never touch
PostgreSQL. :mod:`~queen_tw.ephemeral.engine` holds the rings, cursors and leases,
:mod:`~queen_tw.ephemeral.waiting` parks long polls, :mod:`~queen_tw.ephemeral.declarations`
reads and writes the stored options and :mod:`~queen_tw.ephemeral.service` ties them to the
process's life.
"""
