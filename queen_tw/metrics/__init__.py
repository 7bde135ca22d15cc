"""Metrics of queen-tw (issue 18, WIRE.md 3.8): what each worker counts on the message path
(:mod:`.recorder`), samples of the process (:mod:`.sampler`), the rows written to PostgreSQL
every aggregate interval (:mod:`.aggregator`, sql/functions/040_metrics.sql) and the
Prometheus families (:mod:`.exposition`), put together in :mod:`.wiring`."""
