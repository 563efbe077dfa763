-- The relay's fence (src/core/relay_claim.c, relay_fence_sql): what the pg_locks lookup costs the
-- server, against `SELECT 1` in the same run. A measurement, not a test.
--   psql "$QX_DB__URL" -f bench/relay_fence.sql
-- Each DO block runs its statement N times inside the server (no round trips): the difference
-- per call is what the fence adds to a claim or mark of the relay's second connection.
SELECT pg_advisory_lock(hashtext('qx_relay'), hashtext(current_schema() || ' shard 0 of 1'));
\timing on
DO $$ DECLARE i int; x int; BEGIN FOR i IN 1..20000 LOOP
  SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_locks
     WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() AND objsubid = 2
       AND classid = hashtext('qx_relay')::oid
       AND objid = hashtext(current_schema() || ' ' || 'shard 0 of 1')::oid)
   THEN 1 ELSE set_config('qx.relay_fence', 'the shard lock is gone', true)::int END INTO x;
END LOOP; END $$;
DO $$ DECLARE i int; x int; BEGIN FOR i IN 1..20000 LOOP SELECT 1 INTO x; END LOOP; END $$;
\timing off
SELECT pg_advisory_unlock(hashtext('qx_relay'), hashtext(current_schema() || ' shard 0 of 1'));
