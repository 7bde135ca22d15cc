"""The ``queen-tw`` admin command line (issue #22): status, queues, dead letters, consumer
groups, maintenance, the file buffer, schema migrations and queue backups.

Everything except ``migrate`` goes through the server's HTTP API (:mod:`queen_tw.cli.api`),
so it works against any instance, with the same JWT levels as any other client; ``migrate``
uses the server's own schema installer. Run it as ``queen-tw`` or ``python -m queen_tw.cli``.
"""
