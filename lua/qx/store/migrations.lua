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
        version = 3,
        name = "event store",
        sql = [[
-- The seed's event and snapshot tables (same names, columns, types and index names), plus
-- what gap-safe global reads need: global_position (commit-independent order within a
-- transaction) and tx_id (the id of the writing transaction). See qx/store/event_store for why
-- reading below pg_snapshot_xmin(pg_current_snapshot()) in (tx_id, global_position) order never
-- skips an event that commits late.
CREATE TABLE IF NOT EXISTS qx_aggregate_events (
    id             uuid PRIMARY KEY,
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(255) NOT NULL,
    sequence       integer NOT NULL,
    event_type     varchar(255) NOT NULL,
    event_name     varchar(255) NOT NULL,
    payload        jsonb NOT NULL DEFAULT '{}',
    occurred_at    timestamptz NOT NULL DEFAULT now(),
    tenant_id      varchar(255)
);
ALTER TABLE qx_aggregate_events
    ADD COLUMN IF NOT EXISTS global_position bigserial,
    ADD COLUMN IF NOT EXISTS tx_id xid8 NOT NULL DEFAULT pg_current_xact_id();

-- Rows of a table that existed before (a seed database) all got this transaction's id and
-- positions in storage order: number them so each stream stays in sequence order (the running
-- maximum of occurred_at never decreases along a stream), before the unique index exists.
UPDATE qx_aggregate_events e SET global_position = o.rn
FROM (SELECT id, row_number() OVER (ORDER BY t, aggregate_type, aggregate_id, sequence) AS rn
      FROM (SELECT id, aggregate_type, aggregate_id, sequence,
                   max(occurred_at) OVER (PARTITION BY aggregate_type, aggregate_id
                                          ORDER BY sequence) AS t
            FROM qx_aggregate_events) r) o
WHERE e.id = o.id;
SELECT setval(pg_get_serial_sequence('qx_aggregate_events', 'global_position'),
              coalesce(max(global_position), 0) + 1, false)
FROM qx_aggregate_events;

CREATE UNIQUE INDEX IF NOT EXISTS ix_qx_aggregate_events_aggregate
    ON qx_aggregate_events (aggregate_type, aggregate_id, sequence);
-- the seed's index on event_name is replaced by one that also serves reads of some event
-- names in (tx_id, global_position) order
CREATE INDEX IF NOT EXISTS qx_aggregate_events_name
    ON qx_aggregate_events (event_name, tx_id, global_position);
CREATE UNIQUE INDEX IF NOT EXISTS qx_aggregate_events_global
    ON qx_aggregate_events (tx_id, global_position);
CREATE INDEX IF NOT EXISTS qx_aggregate_events_category
    ON qx_aggregate_events (aggregate_type, tx_id, global_position);

-- Every insert, whoever writes it: tx_id is the writing transaction's id (never a value the
-- client sent), sequences start at 1 and follow a stored event, and event n+1 of a stream is
-- refused (QX409, a conflict: run the unit of work again) when its transaction id is lower
-- than event n's. That happens only when the writer took its id before event n committed and
-- read it afterwards; refusing it keeps (tx_id, global_position) order = sequence order in
-- every stream. Rows earlier in the same statement are visible here (a VOLATILE trigger
-- function sees the rows its statement inserted before).
CREATE OR REPLACE FUNCTION qx_aggregate_events_before_insert() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    prev xid8;
BEGIN
    NEW.tx_id := pg_current_xact_id();
    IF NEW.sequence < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'QX422', MESSAGE = format(
            'event store: %s %s: sequence %s is below 1', NEW.aggregate_type, NEW.aggregate_id,
            NEW.sequence);
    END IF;
    IF NEW.sequence > 1 THEN
        SELECT e.tx_id INTO prev FROM qx_aggregate_events e
        WHERE e.aggregate_type = NEW.aggregate_type AND e.aggregate_id = NEW.aggregate_id
          AND e.sequence = NEW.sequence - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'QX422', MESSAGE = format(
                'event store: %s %s: sequence %s does not follow a stored event',
                NEW.aggregate_type, NEW.aggregate_id, NEW.sequence);
        END IF;
        IF prev > NEW.tx_id THEN
            RAISE EXCEPTION USING ERRCODE = 'QX409', MESSAGE = format(
                'event store: %s %s: sequence %s was written by a transaction older than the '
                'one that wrote sequence %s (it took its id before that event committed); '
                'run it again', NEW.aggregate_type, NEW.aggregate_id, NEW.sequence,
                NEW.sequence - 1);
        END IF;
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS qx_aggregate_events_before_insert ON qx_aggregate_events;
CREATE TRIGGER qx_aggregate_events_before_insert BEFORE INSERT ON qx_aggregate_events
    FOR EACH ROW EXECUTE FUNCTION qx_aggregate_events_before_insert();

CREATE TABLE IF NOT EXISTS qx_aggregate_snapshots (
    id             uuid PRIMARY KEY,
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(255) NOT NULL,
    state          jsonb NOT NULL DEFAULT '{}',
    version        integer NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now(),
    tenant_id      varchar(255)
);
-- qx: the shape of state (a class's snapshot_version); other shapes are ignored on load
ALTER TABLE qx_aggregate_snapshots ADD COLUMN IF NOT EXISTS state_version integer;
CREATE UNIQUE INDEX IF NOT EXISTS ix_qx_aggregate_snapshots_aggregate
    ON qx_aggregate_snapshots (aggregate_type, aggregate_id);
]],
    },
    {
        version = 4,
        name = "projection checkpoints",
        sql = [[
-- The seed's table (projection_name, last_sequence, updated_at) plus the gap-safe checkpoint:
-- the (tx_id, global_position) after which the projection reads next. A batch's handlers and
-- the move of its checkpoint commit in one transaction.
CREATE TABLE IF NOT EXISTS qx_projection_checkpoints (
    projection_name varchar(255) PRIMARY KEY,
    last_sequence   integer NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE qx_projection_checkpoints
    ADD COLUMN IF NOT EXISTS tx_id xid8 NOT NULL DEFAULT '0',
    ADD COLUMN IF NOT EXISTS global_position bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS events_applied bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS rebuilt_at timestamptz;
]],
    },
    {
        version = 5,
        name = "outbox relay",
        sql = [[
-- The relay holds back the later rows of a partition key while an earlier one is pending (it
-- failed and waits for its next attempt, or another transaction holds it): this finds the
-- pending rows of one key without scanning every pending row.
CREATE INDEX IF NOT EXISTS qx_outbox_events_pending_key
    ON qx_outbox_events (partition_key, seq)
    WHERE published_at IS NULL AND dead_at IS NULL AND partition_key IS NOT NULL;
-- Rows waiting for a retry hold their key; there are few of them, so asking "has this key a
-- row waiting for a retry before this one?" for every row of a claim stays cheap.
CREATE INDEX IF NOT EXISTS qx_outbox_events_retry_key
    ON qx_outbox_events (partition_key, seq)
    WHERE published_at IS NULL AND dead_at IS NULL AND next_attempt_at IS NOT NULL;
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
    {
        version = 7,
        name = "archived streams",
        sql = [[
-- Archived streams (docs/event-store.md, "Archived streams"): a closed stream's events move
-- from the hot table to qx_aggregate_events_archive with their tx_id and global_position
-- unchanged, so a global read of the union of both tables returns every event once, in the
-- same order, whenever the move commits. qx_archived_streams names the closed streams.
CREATE TABLE IF NOT EXISTS qx_archived_streams (
    aggregate_type varchar(255) NOT NULL,
    aggregate_id   varchar(255) NOT NULL,
    last_sequence  integer NOT NULL,
    events         integer NOT NULL,
    tenant_id      varchar(255),
    archived_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);
-- the hot table's columns (no defaults: rows keep the values they were written with)
CREATE TABLE IF NOT EXISTS qx_aggregate_events_archive (LIKE qx_aggregate_events);
CREATE UNIQUE INDEX IF NOT EXISTS qx_aggregate_events_archive_id
    ON qx_aggregate_events_archive (id);
CREATE UNIQUE INDEX IF NOT EXISTS qx_aggregate_events_archive_aggregate
    ON qx_aggregate_events_archive (aggregate_type, aggregate_id, sequence);
CREATE UNIQUE INDEX IF NOT EXISTS qx_aggregate_events_archive_global
    ON qx_aggregate_events_archive (tx_id, global_position);
CREATE INDEX IF NOT EXISTS qx_aggregate_events_archive_name
    ON qx_aggregate_events_archive (event_name, tx_id, global_position);
CREATE INDEX IF NOT EXISTS qx_aggregate_events_archive_category
    ON qx_aggregate_events_archive (aggregate_type, tx_id, global_position);

-- The lock an append shares and an archive takes alone: one of 1024 per stream (a hash), so a
-- transaction appending to many streams holds at most 1024 locks; two streams that share one
-- only make an archive wait for the other's open appends.
CREATE OR REPLACE FUNCTION qx_archive_lock_key(agg_type text, agg_id text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext(agg_type || '/' || agg_id) & 1023 $$;

-- Every insert into the hot table, whoever writes it: refused (QX409, a conflict) when its
-- stream is archived. The shared lock is taken before the check, so an archive that commits
-- while this transaction waits is seen (READ COMMITTED: the check's snapshot is taken after
-- the wait), and an archive that starts later waits for this transaction to end and then moves
-- its rows too. Named to run before qx_aggregate_events_before_insert (triggers run in name
-- order), so an append to an archived stream says so rather than "does not follow".
CREATE OR REPLACE FUNCTION qx_aggregate_events_archived_guard() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('qx_archived_streams'),
                                         qx_archive_lock_key(NEW.aggregate_type, NEW.aggregate_id));
    IF EXISTS (SELECT 1 FROM qx_archived_streams a
               WHERE a.aggregate_type = NEW.aggregate_type
                 AND a.aggregate_id = NEW.aggregate_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'QX409', MESSAGE = format(
            'event store: %s %s: stream archived', NEW.aggregate_type, NEW.aggregate_id);
    END IF;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS qx_aggregate_events_archived_guard ON qx_aggregate_events;
CREATE TRIGGER qx_aggregate_events_archived_guard BEFORE INSERT ON qx_aggregate_events
    FOR EACH ROW EXECUTE FUNCTION qx_aggregate_events_archived_guard();

-- Archives one stream: takes its lock alone (waiting for the open appends to it), then, in
-- statements that see what those committed, moves every event to the archive, drops the
-- snapshot and names the stream in qx_archived_streams. tenant (or NULL) limits it to that
-- tenant's stream; expected (or NULL) is the version the caller saw. QX404 when there is no
-- such stream, QX409 when it is archived already or has moved past expected, QX422 outside
-- READ COMMITTED or when the archive table lacks a column of the hot table (a migration that
-- adds a column to qx_aggregate_events must add it to qx_aggregate_events_archive too).
CREATE OR REPLACE FUNCTION qx_archive_stream(agg_type text, agg_id text, tenant text,
                                             expected integer)
RETURNS TABLE (events integer, last_sequence integer, archived_at text)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    cols    text;
    missing text;
    n       integer;
    last_seq integer;
    other_tenant boolean;
    stream_tenant text;
    moved   integer;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION USING ERRCODE = 'QX422', MESSAGE = format(
            'event store: archive runs in READ COMMITTED, not %s',
            current_setting('transaction_isolation'));
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('qx_archived_streams'),
                                  qx_archive_lock_key(agg_type, agg_id));
    SELECT a.tenant_id INTO stream_tenant FROM qx_archived_streams a
    WHERE a.aggregate_type = agg_type AND a.aggregate_id = agg_id;
    IF FOUND AND (tenant IS NULL OR stream_tenant IS NOT DISTINCT FROM tenant) THEN
        RAISE EXCEPTION USING ERRCODE = 'QX409', MESSAGE = format(
            'event store: %s %s: stream archived already', agg_type, agg_id);
    END IF;
    SELECT count(*), max(e.sequence),
           coalesce(bool_or(e.tenant_id IS DISTINCT FROM tenant), false), min(e.tenant_id)
    INTO n, last_seq, other_tenant, stream_tenant
    FROM qx_aggregate_events e
    WHERE e.aggregate_type = agg_type AND e.aggregate_id = agg_id;
    IF n = 0 OR (tenant IS NOT NULL AND other_tenant) THEN
        RAISE EXCEPTION USING ERRCODE = 'QX404', MESSAGE = format(
            'event store: %s %s: no such stream', agg_type, agg_id);
    END IF;
    IF expected IS NOT NULL AND last_seq <> expected THEN
        RAISE EXCEPTION USING ERRCODE = 'QX409', MESSAGE = format(
            'event store: %s %s: stream is at version %s, not %s; load it again',
            agg_type, agg_id, last_seq, expected);
    END IF;
    SELECT string_agg(quote_ident(h.attname), ', ' ORDER BY h.attnum) INTO missing
    FROM pg_attribute h
    WHERE h.attrelid = 'qx_aggregate_events'::regclass AND h.attnum > 0 AND NOT h.attisdropped
      AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = 'qx_aggregate_events_archive'::regclass
                        AND a.attname = h.attname AND NOT a.attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'QX422', MESSAGE = format(
            'event store: qx_aggregate_events_archive lacks column(s) %s of qx_aggregate_events',
            missing);
    END IF;
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum) INTO cols
    FROM pg_attribute a
    WHERE a.attrelid = 'qx_aggregate_events_archive'::regclass AND a.attnum > 0
      AND NOT a.attisdropped;
    EXECUTE format('WITH m AS (DELETE FROM qx_aggregate_events '
                   'WHERE aggregate_type = $1 AND aggregate_id = $2 RETURNING %s) '
                   'INSERT INTO qx_aggregate_events_archive (%s) SELECT %s FROM m',
                   cols, cols, cols)
        USING agg_type, agg_id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    DELETE FROM qx_aggregate_snapshots s
    WHERE s.aggregate_type = agg_type AND s.aggregate_id = agg_id;
    INSERT INTO qx_archived_streams AS a
        (aggregate_type, aggregate_id, last_sequence, events, tenant_id)
    VALUES (agg_type, agg_id, last_seq, moved, coalesce(tenant, stream_tenant));
    RETURN QUERY SELECT moved, last_seq,
        to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
END
$$;
]],
    },
    {
        version = 8,
        name = "projection versions",
        sql = [[
-- Blue/green projections: the versions of a projection, each with its own checkpoint row and
-- tables (<table>_v<N>); readers read views named <table> that point at the live version's
-- tables. At most one live version per projection. What a version reads (its event names and
-- aggregate types) is kept so that switch can tell how far behind it is without its code.
CREATE TABLE IF NOT EXISTS qx_projection_versions (
    projection_name varchar(255) NOT NULL,
    version         integer NOT NULL CHECK (version >= 1),
    checkpoint_name varchar(255) NOT NULL UNIQUE,
    tables          jsonb NOT NULL DEFAULT '[]',
    event_names     jsonb NOT NULL DEFAULT '[]',
    aggregate_types jsonb,
    live            boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    switched_at     timestamptz,
    PRIMARY KEY (projection_name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS qx_projection_versions_live
    ON qx_projection_versions (projection_name) WHERE live;
]],
    },
    {
        version = 9,
        name = "trace context on outbox rows and stored events",
        sql = [[
-- W3C Trace Context of the unit of work that wrote the row (NULL when it had none): the relay
-- sends it as the traceparent and tracestate headers, projections read it with the event.
-- Nullable and without a default: adding them rewrites nothing.
ALTER TABLE qx_outbox_events ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE qx_outbox_events ADD COLUMN IF NOT EXISTS tracestate text;
ALTER TABLE qx_aggregate_events ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE qx_aggregate_events ADD COLUMN IF NOT EXISTS tracestate text;
-- archived events keep theirs (the archive has every column of the hot table)
ALTER TABLE qx_aggregate_events_archive ADD COLUMN IF NOT EXISTS traceparent text;
ALTER TABLE qx_aggregate_events_archive ADD COLUMN IF NOT EXISTS tracestate text;
]],
    },
    {
        version = 10,
        name = "personal data keys (erasure)",
        sql = [[
-- One AES-256 key per data subject; forgetting the subject deletes its key and leaves the row
-- as a tombstone (key NULL, forgotten_at set), which refuses new personal data of that subject.
CREATE TABLE IF NOT EXISTS qx_subject_keys (
    subject_id   uuid PRIMARY KEY,
    key          bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    forgotten_at timestamptz,
    CONSTRAINT qx_subject_keys_tombstone CHECK ((key IS NULL) = (forgotten_at IS NOT NULL)),
    CONSTRAINT qx_subject_keys_length CHECK (key IS NULL OR length(key) = 32)
);

-- The event-store streams that hold a subject's personal data, so that forgetting it can drop
-- those streams' snapshots (a snapshot is the aggregate's own state, in clear).
CREATE TABLE IF NOT EXISTS qx_subject_streams (
    subject_id     uuid NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    PRIMARY KEY (subject_id, aggregate_type, aggregate_id)
);
CREATE INDEX IF NOT EXISTS qx_subject_streams_stream
    ON qx_subject_streams (aggregate_type, aggregate_id);

-- Bumped by every forget, in its transaction: a reader that keeps keys between reads asks for
-- it with each read and drops what it keeps when it moved.
CREATE TABLE IF NOT EXISTS qx_subject_keys_generation (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n   bigint NOT NULL
);
INSERT INTO qx_subject_keys_generation (one, n) VALUES (true, 0) ON CONFLICT DO NOTHING;

-- Called in the transaction that writes sealed values, with [[subject, type|null, id|null], ...]
-- (the subjects, and the streams that now hold their personal data): refuses a forgotten subject
-- (22023, which qx reports as invalid) and notes the streams. With hold, the keys are locked FOR
-- SHARE until the commit, so a forget waits for this transaction and then drops the snapshot it
-- writes (an append that takes a snapshot asks for it; without a snapshot, a forget committed
-- between this check and the commit only leaves values sealed under a deleted key).
CREATE OR REPLACE FUNCTION qx_subject_keys_hold(pairs jsonb, hold boolean) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    ids  uuid[] := ARRAY(SELECT DISTINCT (p->>0)::uuid FROM jsonb_array_elements(pairs) p
                         ORDER BY 1);
    n    integer;
    gone uuid;
BEGIN
    IF hold THEN
        SELECT count(*) INTO n FROM (
            SELECT 1 FROM qx_subject_keys
             WHERE subject_id = ANY (ids) AND key IS NOT NULL
             ORDER BY subject_id FOR SHARE) AS held;
    ELSE
        SELECT count(*) INTO n FROM qx_subject_keys
         WHERE subject_id = ANY (ids) AND key IS NOT NULL;
    END IF;
    IF n < cardinality(ids) THEN
        SELECT i INTO gone FROM unnest(ids) AS i
         WHERE NOT EXISTS (SELECT 1 FROM qx_subject_keys k
                            WHERE k.subject_id = i AND k.key IS NOT NULL)
         LIMIT 1;
        RAISE EXCEPTION 'data subject % is forgotten: no personal data of it is recorded', gone
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO qx_subject_streams (subject_id, aggregate_type, aggregate_id)
    SELECT DISTINCT (p->>0)::uuid, p->>1, p->>2 FROM jsonb_array_elements(pairs) p
     WHERE p->>1 IS NOT NULL
    ON CONFLICT DO NOTHING;
    RETURN n;
END
$$;
]],
    },
    {
        version = 11,
        name = "erasure: the append without the per-stream row",
        sql = [[
-- The check an append of personal data queues in its commit's round trip, in place of
-- qx_subject_keys_hold: refuses a forgotten subject (22023, which qx reports as invalid); with
-- hold, the keys are locked FOR SHARE until the commit (an append that writes a snapshot). It
-- writes nothing: which streams' snapshots hold a subject's data is noted when a snapshot is
-- written (below), not on every append. ids are distinct.
CREATE OR REPLACE FUNCTION qx_subject_keys_alive(ids uuid[], hold boolean) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n    integer;
    gone uuid;
BEGIN
    IF hold THEN
        SELECT count(*) INTO n FROM (
            SELECT 1 FROM qx_subject_keys
             WHERE subject_id = ANY (ids) AND key IS NOT NULL
             ORDER BY subject_id FOR SHARE) AS held;
    ELSE
        SELECT count(*) INTO n FROM qx_subject_keys
         WHERE subject_id = ANY (ids) AND key IS NOT NULL;
    END IF;
    IF n < cardinality(ids) THEN
        SELECT i INTO gone FROM unnest(ids) AS i
         WHERE NOT EXISTS (SELECT 1 FROM qx_subject_keys k
                            WHERE k.subject_id = i AND k.key IS NOT NULL)
         LIMIT 1;
        RAISE EXCEPTION 'data subject % is forgotten: no personal data of it is recorded', gone
            USING ERRCODE = '22023';
    END IF;
    RETURN n;
END
$$;

-- A snapshot written (by any writer: an append, a rebuild) notes in qx_subject_streams the
-- subjects whose sealed values are in the events it folds and the snapshot before it did not:
-- those of sequences (old version, new version]. forget drops the snapshots of the streams
-- noted for its subject. A sealed value is "qx:sealed:1:<subject>:..." in a top-level field of
-- the payload. Rows noted before (by appends, before this step) stay: a superset is safe.
CREATE OR REPLACE FUNCTION qx_snapshot_subjects() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO qx_subject_streams (subject_id, aggregate_type, aggregate_id)
    SELECT DISTINCT substr(v.value, 13, 36)::uuid, NEW.aggregate_type, NEW.aggregate_id
      FROM qx_aggregate_events e
     CROSS JOIN LATERAL jsonb_each_text(CASE WHEN jsonb_typeof(e.payload) = 'object'
                                             THEN e.payload ELSE '{}' END) AS v
     WHERE e.aggregate_type = NEW.aggregate_type AND e.aggregate_id = NEW.aggregate_id
       AND e.sequence > (CASE WHEN TG_OP = 'UPDATE' THEN OLD.version ELSE 0 END)
       AND e.sequence <= NEW.version
       AND v.value ~ '^qx:sealed:1:[0-9A-Fa-f-]{36}:'
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS qx_snapshot_subjects ON qx_aggregate_snapshots;
CREATE TRIGGER qx_snapshot_subjects AFTER INSERT OR UPDATE ON qx_aggregate_snapshots
    FOR EACH ROW EXECUTE FUNCTION qx_snapshot_subjects();
]],
    },
}
