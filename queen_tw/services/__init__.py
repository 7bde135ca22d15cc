"""Services of the server process: the loop primitive (``periodic``) and the retry helper
(``retry``) every recurring or reconnecting job uses, getting PostgreSQL ready
(``database``), and the background jobs (retention, eviction, statistics)."""
