-- The schema of qx, as numbered steps. A step is applied once, in order, inside the one
-- transaction that qx.migrate holds. Steps are never edited once released: add a new one.
--
-- The qx_* tables keep every column of the Python qx tables with the same types, so services in
-- both languages can share a database; qx's own additions are nullable or defaulted.
return {
    {
        version = 1,
        name = "outbox",
        sql = [[
CREATE TABLE IF NOT EXISTS qx_outbox_events (
    id             uuid PRIMARY KEY,
    event_name     varchar(255) NOT NULL,
    event_version  integer NOT NULL DEFAULT 1,
    payload        jsonb NOT NULL,
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    correlation_id uuid,
    causation_id   uuid,
    tenant_id      uuid,
    published_at   timestamptz,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     varchar(2048)
);
-- qx additions: commit order, per-aggregate ordering, retry schedule, dead letters
ALTER TABLE qx_outbox_events
    ADD COLUMN IF NOT EXISTS seq bigserial,
    ADD COLUMN IF NOT EXISTS partition_key text,
    ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz,
    ADD COLUMN IF NOT EXISTS dead_at timestamptz;
CREATE INDEX IF NOT EXISTS qx_outbox_events_pending
    ON qx_outbox_events (seq) WHERE published_at IS NULL AND dead_at IS NULL;
CREATE INDEX IF NOT EXISTS qx_outbox_events_published_at
    ON qx_outbox_events (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS qx_outbox_events_dead
    ON qx_outbox_events (dead_at) WHERE dead_at IS NOT NULL;
]],
    },
    {
        version = 2,
        name = "repository support",
        sql = [[
-- Raises an error with the given SQLSTATE. A repository statement that is sent ahead in a
-- pipelined batch (a deferred save, a delete) calls it when it touched no row, so the batch fails
-- before its COMMIT: QX409 reads as "conflict", QX404 as "not_found".
CREATE OR REPLACE FUNCTION qx_raise(code text, message text) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
END
$$;

-- UUID version 7 (RFC 9562) made by the server: the 48-bit Unix time in milliseconds, then the
-- version, then random bits, so ids sort by creation time like qx.uuid() ones.
CREATE OR REPLACE FUNCTION qx_uuid_v7() RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    ms bigint := floor(extract(epoch FROM clock_timestamp()) * 1000);
    b  bytea  := uuid_send(gen_random_uuid());
BEGIN
    FOR i IN 0..5 LOOP
        b := set_byte(b, i, ((ms >> (8 * (5 - i))) & 255)::int);
    END LOOP;
    b := set_byte(b, 6, (get_byte(b, 6) & 15) | 112); -- version 7; the variant bits stay 10
    RETURN encode(b, 'hex')::uuid;
END
$$;
]],
    },
    {
        version = 6,
        name = "consumer inbox and dead letters",
        sql = [[
-- One row per event a consumer has handled, written in the handler's own transaction: a
-- redelivered message finds its row and is acknowledged without running the handler again.
CREATE TABLE IF NOT EXISTS qx_inbox (
    consumer   text NOT NULL,
    event_id   uuid NOT NULL,
    event_name varchar(255),
    handled_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS qx_inbox_handled_at ON qx_inbox (handled_at);

-- Messages a consumer gave up on (terminated on the stream): the raw body and headers are kept
-- so that nothing is lost and a dead letter can be replayed. A message is identified by its
-- stream, sequence and stream time, so dead-lettering it twice keeps one row.
CREATE TABLE IF NOT EXISTS qx_dead_letters (
    id            uuid PRIMARY KEY,
    consumer      text NOT NULL,
    stream        text NOT NULL,
    subject       text NOT NULL,
    stream_seq    bigint NOT NULL,
    published_at  timestamptz NOT NULL,
    event_id      text,
    event_name    text,
    event_version integer,
    headers       jsonb NOT NULL DEFAULT '{}',
    data          bytea NOT NULL,
    reason        text NOT NULL,
    error         text,
    deliveries    integer NOT NULL,
    dead_at       timestamptz NOT NULL DEFAULT now(),
    replayed_at   timestamptz,
    UNIQUE (consumer, stream, stream_seq, published_at)
);
CREATE INDEX IF NOT EXISTS qx_dead_letters_pending
    ON qx_dead_letters (consumer, dead_at) WHERE replayed_at IS NULL;
]],
    },
}
