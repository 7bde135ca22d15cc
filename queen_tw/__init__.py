"""queen-tw: a PostgreSQL-backed message queue server on Twisted, wire-compatible with Queen MQ."""

__version__ = "0.1.0"
