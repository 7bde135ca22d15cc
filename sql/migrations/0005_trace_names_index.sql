-- Migration 5: trace events found by name (GET /api/v1/traces/by-name/{name}, WIRE.md 3.6)
-- without reading every event.
CREATE INDEX message_traces_by_name ON queen.message_traces USING gin (trace_names);
