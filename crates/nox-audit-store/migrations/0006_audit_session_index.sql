-- Serves GET /admin/audit/logs?session_id= (newest first). Without it, a
-- session from weeks ago meant walking the time index back through millions
-- of rows: 21 s on 5 million seeded rows (BENCHMARKS.md).
CREATE INDEX audit_actions_session_timestamp ON audit_actions (session_id, "timestamp");
