-- pgbench script for bench/uow_bench.lua: the unit of work's writes as one hand-written
-- transaction, one statement per round trip. uow_bench.lua fills in the {{...}} values with
-- texts of the same sizes as what qx sends (the envelope is one qx made).
BEGIN;
INSERT INTO uow_bench_users (id, name, email) VALUES (gen_random_uuid(), '{{NAME}}', '{{EMAIL}}');
INSERT INTO qx_outbox_events (id, event_name, event_version, payload, occurred_at, correlation_id, causation_id, tenant_id, partition_key) VALUES (gen_random_uuid(), 'bench.user.registered', 1, '{{ENVELOPE}}', now(), gen_random_uuid(), NULL, '{{TENANT}}', '{{PARTITION}}');
COMMIT;
