/*
 * The outbox relay: qx_outbox_events -> JetStream.
 *
 * A batch is one transaction on the relay's own connection:
 *
 *   BEGIN; claim (FOR UPDATE SKIP LOCKED)     one round trip
 *   publish asynchronously, collect the acks  NATS, windowed
 *   mark published; mark failed; COMMIT       one round trip (with the next BEGIN and claim
 *                                             after a batch that found rows)
 *
 * Acks arrive on nats.c's threads (the JetStream context's ack handler). The handler only
 * records the outcome under a mutex and signals the relay's thread, which does everything
 * else; nothing of the caller runs there. At the end of a batch nothing is left pending in the
 * context (unacked messages are taken back), so a late ack can never reach a finished batch.
 *
 * A crash anywhere before COMMIT leaves the rows pending; the next claim publishes them again
 * with the same Nats-Msg-Id and JetStream drops the copies it already has (within its duplicate
 * window), so the stream holds each event once.
 */
#define _GNU_SOURCE /* pipe2 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "nats_internal.h"

/* ---- SQL --------------------------------------------------------------------------------- */

/* Claims pending rows of this shard in commit (seq) order, skipping rows another transaction
 * holds.
 *   held:    keys with a row waiting for its next attempt, and that row's seq: the key's later
 *            rows are held back and take no place in the batch (few such rows: a small index)
 *   claimed: the batch, locked
 *   gaps:    per key, the first pending row of this shard up to the batch's last seq that the
 *            batch does not hold (another transaction locks it, or it waits for a retry); found
 *            with one pass of the pending index, anti-joined with the batch by seq
 * A claimed row with a gap of its key before it is dropped from the batch: that earlier row
 * holds its key.
 *   $4:      seqs of rows this relay has published and is marking in a transaction of its other
 *            connection right now: neither claimed nor gaps (see qx_relay_run). They are locked,
 *            and leaving them out by seq (a hashed <> ALL) before the lock is tried saves
 *            a failed row-lock attempt for each of them */
static const char CLAIM_SQL[] =
    "WITH held AS ("
    " SELECT partition_key, min(seq) AS seq FROM qx_outbox_events"
    " WHERE published_at IS NULL AND dead_at IS NULL AND partition_key IS NOT NULL"
    "   AND next_attempt_at > now()"
    " GROUP BY partition_key),"
    " claimed AS ("
    " SELECT ctid, id, seq, partition_key, event_name, event_version, payload, correlation_id,"
    "        tenant_id, attempts"
    " FROM qx_outbox_events o"
    " WHERE published_at IS NULL AND dead_at IS NULL"
    "   AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
    "   AND ($2::int = 1 OR mod(abs(hashtext(coalesce(partition_key, id::text))::bigint),"
    "                           $2::int) = $3::int)"
    "   AND o.seq <> ALL ($4::int8[])"
    "   AND NOT EXISTS (SELECT 1 FROM held h"
    "                   WHERE h.partition_key = o.partition_key AND h.seq < o.seq)"
    " ORDER BY seq LIMIT $1::int"
    " FOR UPDATE SKIP LOCKED),"
    " gaps AS ("
    " SELECT p.partition_key, min(p.seq) AS seq FROM qx_outbox_events p"
    " WHERE p.published_at IS NULL AND p.dead_at IS NULL AND p.partition_key IS NOT NULL"
    "   AND p.seq <= (SELECT max(seq) FROM claimed)"
    "   AND ($2::int = 1 OR mod(abs(hashtext(p.partition_key)::bigint), $2::int) = $3::int)"
    "   AND p.seq <> ALL ($4::int8[])"
    "   AND NOT EXISTS (SELECT 1 FROM claimed x WHERE x.seq = p.seq)"
    " GROUP BY p.partition_key)"
    " SELECT c.id::text, c.event_name, c.event_version::text, c.payload::text,"
    "        jsonb_typeof(c.payload), c.correlation_id::text, c.tenant_id::text,"
    "        c.partition_key, c.attempts::text, c.seq::text, c.ctid::text"
    " FROM claimed c LEFT JOIN gaps g ON g.partition_key = c.partition_key"
    " WHERE g.seq IS NULL OR g.seq > c.seq"
    " ORDER BY c.seq";

enum { COL_ID, COL_NAME, COL_VERSION, COL_BODY, COL_KIND, COL_CORRELATION, COL_TENANT, COL_KEY,
       COL_ATTEMPTS, COL_SEQ, COL_CTID };

/* by the rows' physical addresses (a TID scan, no index lookups): the batch's transaction has
 * held these rows locked since the claim, so they cannot have moved */
static const char MARK_PUBLISHED_SQL[] =
    "UPDATE qx_outbox_events SET published_at = now(), next_attempt_at = NULL"
    " WHERE ctid = ANY($1::tid[]) AND published_at IS NULL";

/* with delete_published: the stream is the record, and a DELETE writes far less than an UPDATE
 * (no new row version, no index entries) */
static const char DELETE_PUBLISHED_SQL[] =
    "DELETE FROM qx_outbox_events WHERE ctid = ANY($1::tid[]) AND published_at IS NULL";

/* attempts + 1, the error, the next attempt after base * 2^attempts (at most max), and the
 * dead-letter time when the row cannot be sent or has failed max_attempts times */
static const char MARK_FAILED_SQL[] =
    "UPDATE qx_outbox_events o SET attempts = o.attempts + 1, last_error = left(f.error, 2048),"
    " next_attempt_at = CASE WHEN f.dead OR ($4::int > 0 AND o.attempts + 1 >= $4::int)"
    "   THEN NULL ELSE now() + make_interval(secs => least($6::float8,"
    "   $5::float8 * power(2, least(o.attempts, 30))) / 1000.0) END,"
    " dead_at = CASE WHEN f.dead OR ($4::int > 0 AND o.attempts + 1 >= $4::int)"
    "   THEN now() END"
    " FROM unnest($1::uuid[], $2::text[], $3::bool[]) AS f(id, error, dead)"
    " WHERE o.id = f.id AND o.published_at IS NULL AND o.dead_at IS NULL";

/* one lock per outbox (the schema it lives in) and shard */
static const char LOCK_SQL[] =
    "SELECT pg_try_advisory_lock(hashtext('qx_relay'),"
    "                            hashtext(current_schema() || ' ' || $1))::text";

/* ---- state ------------------------------------------------------------------------------- */

enum row_state { ROW_WAITING, ROW_INFLIGHT, ROW_ACKED, ROW_FAILED, ROW_DEAD, ROW_HELD };

#define ROW_ERROR_MAX 256

/* Row i of a batch is row i of its claim result. */
typedef struct row {
    int attempts;
    int state;
    int next;        /* the next row of the same key in this batch, or -1 */
    char error[ROW_ERROR_MAX];
} row;

typedef struct completion {
    int idx;
    int ok, duplicate;
    char error[ROW_ERROR_MAX];
} completion;

/* a growing text buffer for array parameters */
typedef struct buf {
    char *p;
    size_t len, cap;
    int failed;
} buf;

/* The statements that mark a batch's outcome and commit it, with what they point into; they may
 * be sent from another thread while the relay goes on with the next batch. */
typedef struct marking {
    buf acked, ids, errors, dead;
    char max_attempts[16], base[16], maxd[16];
    const char *pub_params[1], *fail_params[6];
    qx_stmt stmts[3];
    qx_result *results[3];
    int nstmts, failed_idx;
    qx_status q;
    qx_error err;
} marking;

/* A claimed batch: the rows one transaction of one of the relay's connections holds. */
typedef struct batch {
    int ci;          /* the connection: slot k always uses conns[k] */
    qx_result *res;  /* the claim; NULL when the slot is free */
    int n;
    row *rows;
    int *ready;      /* rows that may be sent now: the first of each key, then successors */
    int nready, head, inflight, settled;
    qx_relay_result out;
    marking mk;
    jsCtx *js;       /* the context its messages go through */
} batch;

struct qx_relay {
    qx_relay_options o;
    char *conninfo, *prefix, *channel;
    char lock_name[64];
    qx_nats *nats;
    jsCtx *js;          /* the relay's own context: its ack handler is on_ack */
    qx_nats *bulk;      /* a connection that gathers writes, for batches of many keys ... */
    jsCtx *bulk_js;     /* ... and its context (also on_ack) */
    double bulk_retry_at; /* after a failed attempt to open it, not before this (wall_now) */
    qx_conn *conns[2];  /* conns[0] holds the shard lock and LISTENs; both run batches */
    int leader;
    batch slot[2];      /* the batch being published and the one being marked */
    int *keyslots;      /* per-batch key -> last row, open addressing */
    int keycap;
    char *subject;
    size_t subject_cap;
    completion *local;  /* completions taken over from the handler */

    /* shared with the ack handler; only one batch publishes at a time */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    completion *done;
    int ndone;
    int want;           /* wake the relay's thread when ndone reaches this ... */
    const row *pub_rows;/* ... or when an acked row has a successor of its key (rows[i].next) */
    int urgent;         /* ... or a publish failed: then this is set */
    natsMsg **map_msg;  /* unacked message -> row index, open addressing */
    int *map_idx;
    int map_cap;

    volatile int stop;
    int wake[2];        /* a byte here cuts a wait short */
    qx_relay_stats stats;
};

static double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void note_error(qx_relay *r, const qx_error *err)
{
    r->stats.errors++;
    snprintf(r->stats.last_error, sizeof r->stats.last_error, "%s: %.990s",
             qx_status_name(err->status), err->message);
}

/* ---- the unacked-message map (guarded by mu) --------------------------------------------- */

static unsigned int ptr_hash(const void *p)
{
    uintptr_t v = (uintptr_t)p;
    v ^= v >> 17;
    v *= 0xed5ad4bbu;
    v ^= v >> 11;
    return (unsigned int)v;
}

static void map_put(qx_relay *r, natsMsg *m, int idx)
{
    unsigned int i = ptr_hash(m) & (unsigned int)(r->map_cap - 1);
    while (r->map_msg[i] != NULL)
        i = (i + 1) & (unsigned int)(r->map_cap - 1);
    r->map_msg[i] = m;
    r->map_idx[i] = idx;
}

/* Removes m and returns its row index, or -1. Linear probing with backward-shift deletion. */
static int map_take(qx_relay *r, const natsMsg *m)
{
    unsigned int mask = (unsigned int)(r->map_cap - 1);
    unsigned int i = ptr_hash(m) & mask, j;
    int idx;
    for (;;) {
        if (r->map_msg[i] == NULL)
            return -1;
        if (r->map_msg[i] == m)
            break;
        i = (i + 1) & mask;
    }
    idx = r->map_idx[i];
    r->map_msg[i] = NULL;
    for (j = (i + 1) & mask; r->map_msg[j] != NULL; j = (j + 1) & mask) {
        unsigned int home = ptr_hash(r->map_msg[j]) & mask;
        /* move j back to i when its home is not in (i, j] (cyclically) */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            r->map_msg[i] = r->map_msg[j];
            r->map_idx[i] = r->map_idx[j];
            r->map_msg[j] = NULL;
            i = j;
        }
    }
    return idx;
}

static void map_clear(qx_relay *r)
{
    memset(r->map_msg, 0, sizeof *r->map_msg * (size_t)r->map_cap);
}

/* ---- the ack handler (nats.c thread) ----------------------------------------------------- */

static void on_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    qx_relay *r = closure;
    int idx;
    (void)js;
    pthread_mutex_lock(&r->mu);
    idx = map_take(r, msg);
    if (idx >= 0 && r->ndone < r->o.batch_size) {
        completion *c = &r->done[r->ndone++];
        c->idx = idx;
        c->ok = pa != NULL;
        c->duplicate = pa != NULL && pa->Duplicate;
        c->error[0] = '\0';
        if (pa == NULL && pae != NULL) {
            const char *text = pae->ErrText != NULL ? pae->ErrText : natsStatus_GetText(pae->Err);
            if (pae->ErrCode != 0)
                snprintf(c->error, sizeof c->error, "nats: %s (JetStream error %d)", text,
                         (int)pae->ErrCode);
            else
                snprintf(c->error, sizeof c->error, "nats: %s", text);
        } else if (pa == NULL) {
            snprintf(c->error, sizeof c->error, "nats: publish failed");
        }
        /* one wake-up per ack would cost a context switch each: wake when the relay waits for
         * this many, or when the row's key has a next row to send (or on failure) */
        if (!c->ok || r->pub_rows == NULL || r->pub_rows[idx].next >= 0)
            r->urgent = 1;
        if (r->urgent || r->ndone >= r->want)
            pthread_cond_signal(&r->cond);
    }
    pthread_mutex_unlock(&r->mu);
    natsMsg_Destroy(msg); /* with an ack handler the message is ours to destroy */
}

/* ---- options, new, free ------------------------------------------------------------------ */

void qx_relay_options_init(qx_relay_options *o)
{
    memset(o, 0, sizeof *o);
    o->connect_timeout_ms = 10000;
    o->subject_prefix = "qx.events";
    o->channel = "qx_outbox";
    o->batch_size = 1000;
    o->max_in_flight = 1000;
    o->ack_timeout_ms = 5000;
    o->max_attempts = 10;
    o->base_delay_ms = 500;
    o->max_delay_ms = 60000;
    o->poll_interval_ms = 500;
    o->idle_interval_ms = 2000;
    o->shard_id = 0;
    o->shard_count = 1;
    o->lock_retry_ms = 1000;
    o->statement_timeout_ms = 30000;
}

static qx_status check_options(const qx_relay_options *o, qx_error *err)
{
    if (o->conninfo == NULL || o->conninfo[0] == '\0')
        return qx_error_set(err, QX_ERR_INVALID, "relay: no database url");
    if (o->nats == NULL)
        return qx_error_set(err, QX_ERR_INVALID, "relay: no NATS connection");
    if (o->shard_count < 1)
        return qx_error_set(err, QX_ERR_INVALID, "relay: shard_count must be >= 1, got %d",
                            o->shard_count);
    if (o->shard_id < 0 || o->shard_id >= o->shard_count)
        return qx_error_set(err, QX_ERR_INVALID,
                            "relay: shard_id must be from 0 to shard_count - 1 (%d), got %d",
                            o->shard_count - 1, o->shard_id);
    if (o->subject_prefix == NULL || !qx_nats_subject_valid(o->subject_prefix))
        return qx_error_set(err, QX_ERR_INVALID, "relay: subject_prefix is not a valid subject");
    if (o->channel == NULL || o->channel[0] == '\0')
        return qx_error_set(err, QX_ERR_INVALID, "relay: channel must not be empty");
    if (o->batch_size < 1 || o->batch_size > 100000)
        return qx_error_set(err, QX_ERR_INVALID, "relay: batch_size must be from 1 to 100000");
    if (o->max_in_flight < 1 || o->max_in_flight > 100000)
        return qx_error_set(err, QX_ERR_INVALID,
                            "relay: max_in_flight must be from 1 to 100000");
    if (o->ack_timeout_ms < 1 || o->connect_timeout_ms < 0 || o->max_attempts < 0 ||
        o->base_delay_ms < 0 || o->max_delay_ms < 0 || o->poll_interval_ms < 0 ||
        o->idle_interval_ms < 0 || o->lock_retry_ms < 1 || o->statement_timeout_ms < 0)
        return qx_error_set(err, QX_ERR_INVALID,
                            "relay: timeouts and intervals must be >= 0 (ack and lock >= 1)");
    return QX_OK;
}

static int pow2_at_least(int n)
{
    int c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

qx_status qx_relay_new(qx_relay **out, const qx_relay_options *o, qx_error *err)
{
    qx_relay *r;
    jsOptions jo;
    natsStatus s;
    qx_status q;
    int n, k, ok;

    *out = NULL;
    if ((q = check_options(o, err)) != QX_OK)
        return q;
    r = calloc(1, sizeof *r);
    if (r == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    r->o = *o;
    r->wake[0] = r->wake[1] = -1;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cond, NULL);
    n = o->batch_size;
    r->conninfo = strdup(o->conninfo);
    r->prefix = strdup(o->subject_prefix);
    r->channel = strdup(o->channel);
    ok = r->conninfo != NULL && r->prefix != NULL && r->channel != NULL;
    for (k = 0; k < 2; k++) {
        r->slot[k].ci = k;
        r->slot[k].rows = calloc((size_t)n, sizeof *r->slot[k].rows);
        r->slot[k].ready = calloc((size_t)n, sizeof *r->slot[k].ready);
        ok = ok && r->slot[k].rows != NULL && r->slot[k].ready != NULL;
    }
    r->keycap = pow2_at_least(n * 2);
    r->keyslots = calloc((size_t)r->keycap, sizeof *r->keyslots);
    r->done = calloc((size_t)n, sizeof *r->done);
    r->local = calloc((size_t)n, sizeof *r->local);
    r->map_cap = pow2_at_least(n * 2);
    r->map_msg = calloc((size_t)r->map_cap, sizeof *r->map_msg);
    r->map_idx = calloc((size_t)r->map_cap, sizeof *r->map_idx);
    r->subject_cap = 512;
    r->subject = malloc(r->subject_cap);
    if (!ok || r->keyslots == NULL || r->done == NULL || r->local == NULL ||
        r->map_msg == NULL || r->map_idx == NULL || r->subject == NULL) {
        qx_relay_free(r);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    r->o.conninfo = r->conninfo;
    r->o.subject_prefix = r->prefix;
    r->o.channel = r->channel;
    snprintf(r->lock_name, sizeof r->lock_name, "shard %d of %d", o->shard_id, o->shard_count);
    if (pipe2(r->wake, O_NONBLOCK | O_CLOEXEC) != 0) {
        r->wake[0] = r->wake[1] = -1;
        qx_relay_free(r);
        return qx_error_set(err, QX_ERR_NOMEM, "relay: pipe: %s", strerror(errno));
    }

    r->nats = qx_nats_retain(o->nats);
    r->o.nats = r->nats;
    jsOptions_Init(&jo);
    /* the window is enforced here; nats.c's own limit must never stall a publish */
    jo.PublishAsync.MaxPending = (int64_t)o->max_in_flight * 2 + 16;
    jo.PublishAsync.AckHandler = on_ack;
    jo.PublishAsync.AckHandlerClosure = r;
    s = natsConnection_JetStream(&r->js, qx_nats_conn(r->nats), &jo);
    if (s != NATS_OK) {
        q = qx_nats_error(err, s, 0, "relay: JetStream context");
        qx_relay_free(r);
        return q;
    }
    r->stats.started_at = wall_now();
    *out = r;
    return QX_OK;
}

void qx_relay_free(qx_relay *r)
{
    int k;
    if (r == NULL)
        return;
    /* nothing is pending in the contexts between batches, so no ack handler runs after this */
    jsCtx_Destroy(r->js);
    jsCtx_Destroy(r->bulk_js);
    qx_nats_close(r->bulk);
    for (k = 0; k < 2; k++) {
        qx_conn_close(r->conns[k]); /* an open transaction rolls back */
        qx_result_free(r->slot[k].res);
        free(r->slot[k].rows);
        free(r->slot[k].ready);
    }
    qx_nats_close(r->nats);
    if (r->wake[0] >= 0)
        close(r->wake[0]);
    if (r->wake[1] >= 0)
        close(r->wake[1]);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cond);
    free(r->conninfo);
    free(r->prefix);
    free(r->channel);
    free(r->keyslots);
    free(r->done);
    free(r->local);
    free(r->map_msg);
    free(r->map_idx);
    free(r->subject);
    free(r);
}

void qx_relay_stop(qx_relay *r)
{
    char c = 1;
    ssize_t w;
    __atomic_store_n(&r->stop, 1, __ATOMIC_RELEASE);
    w = write(r->wake[1], &c, 1);
    (void)w;
}

void qx_relay_stats_get(qx_relay *r, qx_relay_stats *s)
{
    *s = r->stats;
    s->leader = r->leader;
    s->nats_state = qx_nats_get_state(r->nats);
    s->nats_reconnects = qx_nats_reconnects(r->nats);
}

/* ---- database ---------------------------------------------------------------------------- */

/* Closes connection k; closing conns[0] ends the shard lock. */
static void drop_connection(qx_relay *r, int k)
{
    if (k == 0 && r->leader) {
        r->stats.leader_changes++;
        r->leader = 0;
    }
    qx_conn_close(r->conns[k]);
    r->conns[k] = NULL;
}

static qx_status ensure_connection(qx_relay *r, int k, qx_error *err)
{
    qx_result *res = NULL;
    char timeout[16];
    const char *params[1];
    qx_status q;

    if (r->conns[k] != NULL && !qx_conn_is_broken(r->conns[k]))
        return QX_OK;
    if (r->conns[k] != NULL)
        drop_connection(r, k);
    q = qx_conn_open(&r->conns[k], r->conninfo, r->o.connect_timeout_ms, err);
    if (q != QX_OK)
        return q;
    snprintf(timeout, sizeof timeout, "%d", r->o.statement_timeout_ms);
    params[0] = timeout;
    /* plan_cache_mode: the claim's best plan depends on its parameters (the batch size, one
     * shard or several); a generic plan can sort every pending row to take the first batch.
     * jit: compiling the claim costs seconds and saves nothing on a batch */
    q = qx_conn_exec(r->conns[k], &res,
                     "SELECT set_config('statement_timeout', $1, false),"
                     " set_config('plan_cache_mode', 'force_custom_plan', false),"
                     " set_config('jit', 'off', false)",
                     1, params, NULL, err);
    qx_result_free(res);
    if (q == QX_OK && k == 0)
        q = qx_conn_listen(r->conns[0], r->channel, err);
    if (q != QX_OK)
        drop_connection(r, k);
    return q;
}

/* Takes the shard's advisory lock when this relay does not hold it. */
static qx_status ensure_leader(qx_relay *r, qx_error *err)
{
    qx_result *res = NULL;
    const char *params[1];
    qx_status q;

    if ((q = ensure_connection(r, 0, err)) != QX_OK)
        return q;
    if (r->leader)
        return QX_OK;
    params[0] = r->lock_name;
    q = qx_conn_exec(r->conns[0], &res, LOCK_SQL, 1, params, NULL, err);
    if (q != QX_OK) {
        if (qx_conn_is_broken(r->conns[0]))
            drop_connection(r, 0);
        return q;
    }
    r->leader = qx_result_nrows(res) == 1 && strcmp(qx_result_value(res, 0, 0), "true") == 0;
    qx_result_free(res);
    if (r->leader)
        r->stats.leader_changes++;
    return QX_OK;
}

/* Rolls the open transaction back (its rows stay pending) and frees the batch. */
static void abort_batch(qx_relay *r, batch *b)
{
    qx_result_free(b->res);
    b->res = NULL;
    b->n = 0;
    if (r->conns[b->ci] == NULL)
        return;
    if (qx_conn_is_broken(r->conns[b->ci]) ||
        qx_conn_script(r->conns[b->ci], "ROLLBACK", NULL) != QX_OK)
        drop_connection(r, b->ci);
}

/* ---- a growing text buffer for array parameters ------------------------------------------ */

static void buf_add(buf *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap < b->len + n + 1)
            cap *= 2;
        p = realloc(b->p, cap);
        if (p == NULL) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(buf *b, const char *s) { buf_add(b, s, strlen(s)); }

/* a quoted element of a PostgreSQL array literal */
static void buf_array_text(buf *b, const char *s)
{
    buf_add(b, "\"", 1);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            buf_add(b, "\\", 1);
        buf_add(b, s, 1);
    }
    buf_add(b, "\"", 1);
}

/* ---- claiming ---------------------------------------------------------------------------- */

static void set_stmt(qx_stmt *st, const char *sql, int n, const char *const *values)
{
    st->sql = sql;
    st->nparams = n;
    st->values = values;
    st->lengths = NULL;
}

typedef struct claim_params {
    char limit[16], count[16], shard[16];
    const char *values[4];
} claim_params;

/* seqs: an array literal of the rows being marked on the other connection, or NULL */
static void claim_params_init(qx_relay *r, claim_params *p, const char *seqs)
{
    snprintf(p->limit, sizeof p->limit, "%d", r->o.batch_size);
    snprintf(p->count, sizeof p->count, "%d", r->o.shard_count);
    snprintf(p->shard, sizeof p->shard, "%d", r->o.shard_id);
    p->values[0] = p->limit;
    p->values[1] = p->count;
    p->values[2] = p->shard;
    p->values[3] = seqs != NULL ? seqs : "{}";
}

/* Takes the claim's result into the batch. */
static void claimed(batch *b, qx_result *res)
{
    int i;
    memset(&b->out, 0, sizeof b->out);
    b->res = res;
    b->n = qx_result_nrows(res);
    b->out.leader = 1;
    b->out.claimed = b->n;
    for (i = 0; i < b->n; i++) {
        row *w = &b->rows[i];
        w->attempts = atoi(qx_result_value(res, i, COL_ATTEMPTS));
        w->state = ROW_WAITING;
        w->error[0] = '\0';
    }
}

/* BEGIN and claim, in one round trip, on the batch's connection. */
static qx_status claim(qx_relay *r, batch *b, const char *seqs, qx_error *err)
{
    qx_stmt stmts[2];
    qx_result *results[2] = { NULL, NULL };
    claim_params p;
    int failed = -1;
    qx_status q;

    memset(&b->out, 0, sizeof b->out);
    b->n = 0;
    if ((q = ensure_connection(r, b->ci, err)) != QX_OK)
        return q;
    claim_params_init(r, &p, seqs);
    set_stmt(&stmts[0], "BEGIN", 0, NULL);
    set_stmt(&stmts[1], CLAIM_SQL, 4, p.values);
    q = qx_conn_batch(r->conns[b->ci], results, &failed, stmts, 2, err);
    if (q != QX_OK) {
        abort_batch(r, b);
        return q;
    }
    qx_result_free(results[0]);
    claimed(b, results[1]);
    return QX_OK;
}

/* ---- publishing -------------------------------------------------------------------------- */

static unsigned int str_hash(const char *s)
{
    unsigned int h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* Links each row to the next row of its key: only the first row of a key is ready, and each ack
 * releases the next one. */
static void link_keys(qx_relay *r, batch *b)
{
    unsigned int mask = (unsigned int)(r->keycap - 1);
    int i;
    for (i = 0; i < r->keycap; i++)
        r->keyslots[i] = -1;
    b->nready = 0;
    for (i = 0; i < b->n; i++) {
        row *w = &b->rows[i];
        int first = 1;
        w->next = -1;
        if (!qx_result_isnull(b->res, i, COL_KEY)) {
            const char *key = qx_result_value(b->res, i, COL_KEY);
            unsigned int k = str_hash(key) & mask;
            for (;;) {
                int j = r->keyslots[k];
                if (j < 0) {
                    r->keyslots[k] = i;
                    break;
                }
                if (strcmp(qx_result_value(b->res, j, COL_KEY), key) == 0) {
                    b->rows[j].next = i; /* j was the last row of this key so far */
                    r->keyslots[k] = i;
                    first = 0;
                    break;
                }
                k = (k + 1) & mask;
            }
        }
        if (first)
            b->ready[b->nready++] = i;
    }
}

static void row_fail(row *w, int state, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void row_fail(row *w, int state, const char *fmt, ...)
{
    va_list ap;
    w->state = state;
    va_start(ap, fmt);
    vsnprintf(w->error, sizeof w->error, fmt, ap);
    va_end(ap);
}

/* The later rows of a failed row's key stay as they are: pending, not attempted. */
static int hold_successors(batch *b, int i)
{
    int j, held = 0;
    for (j = b->rows[i].next; j >= 0; j = b->rows[j].next) {
        if (b->rows[j].state == ROW_WAITING) {
            b->rows[j].state = ROW_HELD;
            held++;
        }
    }
    return held;
}

/* Checks what a row needs to be sent; a row that can never be sent is dead-lettered. */
static int row_sendable(qx_relay *r, batch *b, int i, const char **subject)
{
    row *w = &b->rows[i];
    const char *name = qx_result_value(b->res, i, COL_NAME);
    size_t need = strlen(r->prefix) + 1 + strlen(name) + 1;

    if (qx_result_isnull(b->res, i, COL_NAME) || name[0] == '\0') {
        row_fail(w, ROW_DEAD, "invalid: empty event name");
        return 0;
    }
    if (qx_result_isnull(b->res, i, COL_KIND) ||
        strcmp(qx_result_value(b->res, i, COL_KIND), "object") != 0) {
        row_fail(w, ROW_DEAD, "invalid: payload is not an envelope (a JSON object)");
        return 0;
    }
    if (need > r->subject_cap) {
        char *p = realloc(r->subject, need);
        if (p == NULL) {
            row_fail(w, ROW_FAILED, "nomem: out of memory");
            return 0;
        }
        r->subject = p;
        r->subject_cap = need;
    }
    snprintf(r->subject, r->subject_cap, "%s.%s", r->prefix, name);
    if (!qx_nats_subject_valid(r->subject)) {
        row_fail(w, ROW_DEAD, "invalid: event name '%.200s' does not make a valid subject", name);
        return 0;
    }
    *subject = r->subject;
    return 1;
}

static natsStatus set_header(natsMsg *m, const qx_result *res, int row, int col, const char *key)
{
    if (qx_result_isnull(res, row, col))
        return NATS_OK;
    return natsMsgHeader_Set(m, key, qx_result_value(res, row, col));
}

/* Sends row i; returns 1 when it is in flight, 0 when it failed at once. */
static int send_row(qx_relay *r, batch *b, int i)
{
    row *w = &b->rows[i];
    const qx_result *res = b->res;
    const char *subject = NULL;
    natsMsg *m = NULL;
    jsPubOptions po;
    natsStatus s;

    if (!row_sendable(r, b, i, &subject))
        return 0;
    s = natsMsg_Create(&m, subject, NULL, qx_result_value(res, i, COL_BODY),
                       qx_result_length(res, i, COL_BODY));
    if (s == NATS_OK)
        s = set_header(m, res, i, COL_NAME, "qx.event_name");
    if (s == NATS_OK)
        s = set_header(m, res, i, COL_VERSION, "qx.event_version");
    if (s == NATS_OK)
        s = set_header(m, res, i, COL_ID, "qx.event_id");
    if (s == NATS_OK)
        s = set_header(m, res, i, COL_CORRELATION, "qx.correlation_id");
    if (s == NATS_OK)
        s = set_header(m, res, i, COL_TENANT, "qx.tenant_id");
    if (s != NATS_OK) {
        natsMsg_Destroy(m);
        row_fail(w, ROW_FAILED, "nats: %s", natsStatus_GetText(s));
        return 0;
    }
    jsPubOptions_Init(&po);
    po.MsgId = qx_result_value(res, i, COL_ID);

    w->state = ROW_INFLIGHT;
    pthread_mutex_lock(&r->mu);
    map_put(r, m, i); /* before publishing: the ack may come back before the call returns */
    pthread_mutex_unlock(&r->mu);
    s = js_PublishMsgAsync(b->js, &m, &po);
    if (s != NATS_OK) {
        natsStatus last = NATS_OK;
        const char *detail = nats_GetLastError(&last);
        pthread_mutex_lock(&r->mu);
        map_take(r, m);
        pthread_mutex_unlock(&r->mu);
        natsMsg_Destroy(m);
        if (s == NATS_MAX_PAYLOAD)
            row_fail(w, ROW_DEAD, "invalid: the message is larger than the server's max payload");
        else
            row_fail(w, ROW_FAILED, "nats: %s",
                     last == s && detail != NULL ? detail : natsStatus_GetText(s));
        return 0;
    }
    return 1;
}

/* Sends what is ready, up to the window. */
static void send_ready(qx_relay *r, batch *b)
{
    while (b->head < b->nready && b->inflight < r->o.max_in_flight) {
        int i = b->ready[b->head++];
        if (send_row(r, b, i)) {
            b->inflight++;
            continue;
        }
        b->settled++;
        if (b->rows[i].state == ROW_DEAD) {
            /* dead: its key goes on without it */
            if (b->rows[i].next >= 0)
                b->ready[b->nready++] = b->rows[i].next;
        } else {
            b->settled += hold_successors(b, i);
        }
    }
}

/* A batch whose first round has this many rows (one per key) goes through the connection that
 * gathers writes: a socket write per message costs the relay and nats-server more than the
 * millisecond nats.c may hold the last ones. Fewer keys, each waiting for its previous ack,
 * go out at once over the relay's own connection. */
#define BULK_MIN_READY 64
#define BULK_RETRY_SECONDS 30.0

static jsCtx *choose_context(qx_relay *r, const batch *b)
{
    if (b->nready < BULK_MIN_READY || r->o.max_in_flight < BULK_MIN_READY)
        return r->js;
    if (r->bulk == NULL && wall_now() >= r->bulk_retry_at) {
        qx_error e;
        jsOptions jo;
        if (qx_nats_open_gathering(r->nats, &r->bulk, &e) == QX_OK) {
            jsOptions_Init(&jo);
            jo.PublishAsync.MaxPending = (int64_t)r->o.max_in_flight * 2 + 16;
            jo.PublishAsync.AckHandler = on_ack;
            jo.PublishAsync.AckHandlerClosure = r;
            if (natsConnection_JetStream(&r->bulk_js, qx_nats_conn(r->bulk), &jo) != NATS_OK) {
                r->bulk_js = NULL;
                qx_nats_close(r->bulk);
                r->bulk = NULL;
            }
        }
        if (r->bulk == NULL)
            r->bulk_retry_at = wall_now() + BULK_RETRY_SECONDS;
    }
    if (r->bulk != NULL && qx_nats_get_state(r->bulk) == QX_NATS_CONNECTED)
        return r->bulk_js;
    return r->js;
}

/* Starts publishing a claimed batch; publish_wait collects the acks. */
static void publish_start(qx_relay *r, batch *b)
{
    b->head = b->inflight = b->settled = 0;
    link_keys(r, b);
    b->js = choose_context(r, b);
    pthread_mutex_lock(&r->mu);
    r->ndone = 0;
    r->want = 1;
    r->urgent = 0;
    r->pub_rows = b->rows;
    map_clear(r);
    pthread_mutex_unlock(&r->mu);
    send_ready(r, b);
}

static void timespec_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static void apply_completion(batch *b, const completion *c)
{
    row *w = &b->rows[c->idx];
    b->inflight--;
    b->settled++;
    if (c->ok) {
        w->state = ROW_ACKED;
        if (c->duplicate)
            b->out.duplicates++;
        if (w->next >= 0)
            b->ready[b->nready++] = w->next;
    } else {
        row_fail(w, ROW_FAILED, "%s", c->error);
        b->settled += hold_successors(b, c->idx);
    }
}

/* Collects the acks of a batch, sending each key's next row as its previous one is acked,
 * until every row is settled, or until no ack came for ack_timeout_ms: the unacked rows then
 * failed and the messages are taken back from the context. */
static void publish_wait(qx_relay *r, batch *b)
{
    struct timespec deadline;
    int i, timed_out = 0;

    while (b->settled < b->n && b->inflight > 0) {
        int got = 0;
        timespec_after(&deadline, r->o.ack_timeout_ms);
        pthread_mutex_lock(&r->mu);
        /* all in flight, or a quarter of the window when more rows wait for room in it */
        r->want = b->head < b->nready ? (r->o.max_in_flight + 3) / 4 : b->inflight;
        if (r->want > b->inflight)
            r->want = b->inflight;
        if (r->want < 1)
            r->want = 1;
        while (r->ndone < r->want && !r->urgent) {
            if (pthread_cond_timedwait(&r->cond, &r->mu, &deadline) == ETIMEDOUT)
                break;
        }
        got = r->ndone;
        memcpy(r->local, r->done, sizeof *r->local * (size_t)got);
        r->ndone = 0;
        r->urgent = 0;
        pthread_mutex_unlock(&r->mu);
        if (got == 0) {
            timed_out = 1;
            break;
        }
        for (i = 0; i < got; i++)
            apply_completion(b, &r->local[i]);
        send_ready(r, b);
    }

    if (timed_out) {
        /* take the unacked messages back: a late ack then finds nothing to report to */
        natsMsgList pending = { NULL, 0 };
        if (js_PublishAsyncGetPendingList(&pending, b->js) == NATS_OK)
            natsMsgList_Destroy(&pending);
        pthread_mutex_lock(&r->mu);
        for (i = 0; i < r->ndone; i++) /* acks that slipped in meanwhile still count */
            apply_completion(b, &r->done[i]);
        r->ndone = 0;
        map_clear(r);
        pthread_mutex_unlock(&r->mu);
        for (i = 0; i < b->n; i++) {
            if (b->rows[i].state == ROW_INFLIGHT) {
                row_fail(&b->rows[i], ROW_FAILED, "timeout: no ack from JetStream within %d ms",
                         r->o.ack_timeout_ms);
                hold_successors(b, i);
            }
        }
    }
    /* rows never sent (behind a row that did not make it) wait for the next batch */
    for (i = 0; i < b->n; i++)
        if (b->rows[i].state == ROW_WAITING)
            b->rows[i].state = ROW_HELD;
    /* a handler that took its message before the list was taken back finishes first */
    {
        jsPubOptions po;
        jsPubOptions_Init(&po);
        po.MaxWait = 1000;
        js_PublishAsyncComplete(b->js, &po);
    }
}

/* ---- marking ----------------------------------------------------------------------------- */

static void marking_free(marking *mk)
{
    int i;
    for (i = 0; i < mk->nstmts; i++) {
        qx_result_free(mk->results[i]);
        mk->results[i] = NULL;
    }
    free(mk->acked.p);
    free(mk->ids.p);
    free(mk->errors.p);
    free(mk->dead.p);
    memset(mk, 0, sizeof *mk);
}

/* Builds the statements that mark a published batch's outcome, then COMMIT. Counts the outcome
 * into b->out. Returns QX_ERR_NOMEM (and frees what it built) when memory ran out. */
static qx_status mark_prepare(qx_relay *r, batch *b, qx_error *err)
{
    marking *mk = &b->mk;
    qx_relay_result *out = &b->out;
    int nacked = 0, nfailed = 0, i;

    memset(mk, 0, sizeof *mk);
    mk->failed_idx = -1;
    out->published = out->failed = out->dead_lettered = out->held = 0; /* counted here */
    buf_str(&mk->acked, "{");
    buf_str(&mk->ids, "{");
    buf_str(&mk->errors, "{");
    buf_str(&mk->dead, "{");
    for (i = 0; i < b->n; i++) {
        row *w = &b->rows[i];
        const char *id = qx_result_value(b->res, i, COL_ID);
        switch (w->state) {
        case ROW_ACKED:
            if (nacked++ > 0)
                buf_str(&mk->acked, ",");
            buf_array_text(&mk->acked, qx_result_value(b->res, i, COL_CTID)); /* "(p,i)" */
            out->published++;
            break;
        case ROW_FAILED:
        case ROW_DEAD:
            if (nfailed++ > 0) {
                buf_str(&mk->ids, ",");
                buf_str(&mk->errors, ",");
                buf_str(&mk->dead, ",");
            }
            buf_str(&mk->ids, id);
            buf_array_text(&mk->errors, w->error);
            buf_str(&mk->dead, w->state == ROW_DEAD ? "t" : "f");
            if (w->state == ROW_DEAD ||
                (r->o.max_attempts > 0 && w->attempts + 1 >= r->o.max_attempts))
                out->dead_lettered++;
            else
                out->failed++;
            break;
        default:
            out->held++;
            break;
        }
    }
    buf_str(&mk->acked, "}");
    buf_str(&mk->ids, "}");
    buf_str(&mk->errors, "}");
    buf_str(&mk->dead, "}");
    if (mk->acked.failed || mk->ids.failed || mk->errors.failed || mk->dead.failed) {
        marking_free(mk);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    if (nacked > 0) {
        mk->pub_params[0] = mk->acked.p;
        set_stmt(&mk->stmts[mk->nstmts++],
                 r->o.delete_published ? DELETE_PUBLISHED_SQL : MARK_PUBLISHED_SQL, 1,
                 mk->pub_params);
    }
    if (nfailed > 0) {
        snprintf(mk->max_attempts, sizeof mk->max_attempts, "%d", r->o.max_attempts);
        snprintf(mk->base, sizeof mk->base, "%d", r->o.base_delay_ms);
        snprintf(mk->maxd, sizeof mk->maxd, "%d", r->o.max_delay_ms);
        mk->fail_params[0] = mk->ids.p;
        mk->fail_params[1] = mk->errors.p;
        mk->fail_params[2] = mk->dead.p;
        mk->fail_params[3] = mk->max_attempts;
        mk->fail_params[4] = mk->base;
        mk->fail_params[5] = mk->maxd;
        set_stmt(&mk->stmts[mk->nstmts++], MARK_FAILED_SQL, 6, mk->fail_params);
    }
    set_stmt(&mk->stmts[mk->nstmts++], "COMMIT", 0, NULL);
    return QX_OK;
}

/* The round trip: touches nothing but the marking and the batch's connection, so it may run on
 * another thread while that connection is not used elsewhere. */
static void mark_send(qx_conn *conn, marking *mk)
{
    mk->q = qx_conn_batch(conn, mk->results, &mk->failed_idx, mk->stmts, mk->nstmts, &mk->err);
}

/* Takes the outcome of mark_send: on success the batch's slot is free; on failure the
 * transaction is rolled back (the published rows stay pending and go again: JetStream drops
 * the copies) and its error is in err. */
static qx_status mark_complete(qx_relay *r, batch *b, qx_error *err)
{
    marking *mk = &b->mk;
    qx_status q = mk->q;

    if (q == QX_OK) {
        qx_result_free(b->res);
        b->res = NULL;
    } else {
        *err = mk->err;
        abort_batch(r, b);
    }
    marking_free(mk);
    if (q != QX_OK) {
        int claimed_n = b->out.claimed;
        memset(&b->out, 0, sizeof b->out);
        b->out.claimed = claimed_n;
        b->out.leader = r->leader;
    }
    return q;
}

/* Marks the outcome of a published batch and commits it, in one round trip. */
static qx_status finish(qx_relay *r, batch *b, qx_error *err)
{
    qx_status q = mark_prepare(r, b, err);
    if (q != QX_OK) {
        abort_batch(r, b);
        memset(&b->out, 0, sizeof b->out);
        b->out.leader = r->leader;
        return q;
    }
    if (r->conns[b->ci] == NULL) {
        /* cannot happen while a batch is claimed: its connection holds the transaction */
        b->mk.q = qx_error_set(&b->mk.err, QX_ERR_CONNECTION, "relay: connection lost");
    } else {
        mark_send(r->conns[b->ci], &b->mk);
    }
    return mark_complete(r, b, err);
}

static void account(qx_relay *r, const qx_relay_result *o)
{
    r->stats.batches++;
    r->stats.claimed += o->claimed;
    r->stats.published += o->published;
    r->stats.duplicates += o->duplicates;
    r->stats.failed += o->failed;
    r->stats.dead_lettered += o->dead_lettered;
    r->stats.held += o->held;
    r->stats.last_batch_at = wall_now();
    r->stats.last_error[0] = '\0';
}

/* Leadership and NATS before a claim: QX_OK with r->leader = 0 when another relay leads. */
static qx_status ready_to_claim(qx_relay *r, qx_error *err)
{
    qx_status q = ensure_leader(r, err);
    if (q != QX_OK || !r->leader)
        return q;
    if (qx_nats_get_state(r->nats) != QX_NATS_CONNECTED)
        /* claiming now would only record failures: wait for the connection to come back */
        return qx_error_set(err, QX_ERR_CONNECTION, "NATS is %s",
                            qx_nats_state_name(qx_nats_get_state(r->nats)));
    return QX_OK;
}

qx_status qx_relay_run_once(qx_relay *r, qx_relay_result *out, qx_error *err)
{
    batch *b = &r->slot[0];
    qx_status q;

    memset(out, 0, sizeof *out);
    qx_error_clear(err);
    q = ready_to_claim(r, err);
    if (q == QX_OK && !r->leader)
        return QX_OK;
    if (q == QX_OK)
        q = claim(r, b, NULL, err);
    if (q == QX_OK) {
        if (b->n > 0) {
            publish_start(r, b);
            publish_wait(r, b);
        }
        q = finish(r, b, err);
        *out = b->out;
    }
    out->leader = r->leader;
    if (q != QX_OK) {
        note_error(r, err);
        return q;
    }
    account(r, out);
    return QX_OK;
}

/* ---- the loop ---------------------------------------------------------------------------- */

static volatile sig_atomic_t signal_stop;
static volatile sig_atomic_t signal_fd = -1;

static void on_signal(int sig)
{
    char c = 1;
    (void)sig;
    signal_stop = 1;
    if (signal_fd >= 0) {
        ssize_t w = write(signal_fd, &c, 1);
        (void)w;
    }
}

static int stopping(qx_relay *r, int handle_signals)
{
    return __atomic_load_n(&r->stop, __ATOMIC_ACQUIRE) || (handle_signals && signal_stop);
}

static void drain_wake(qx_relay *r)
{
    char b[64];
    while (read(r->wake[0], b, sizeof b) > 0)
        ;
}

/* Waits up to timeout_ms for a NOTIFY on the relay's connection (or a stop); returns 1 when
 * one came. */
static int wait_for_work(qx_relay *r, int timeout_ms)
{
    struct pollfd p[2];
    qx_notify *ns = NULL;
    int count = 0, np = 1, rc;

    if (r->conns[0] != NULL) {
        if (qx_conn_notifications(r->conns[0], &ns, &count, 0, NULL) == QX_OK && count > 0) {
            qx_notify_free(ns, count);
            return 1;
        }
        p[1].fd = qx_conn_socket(r->conns[0]);
        p[1].events = POLLIN;
        p[1].revents = 0;
        np = p[1].fd >= 0 ? 2 : 1;
    }
    p[0].fd = r->wake[0];
    p[0].events = POLLIN;
    p[0].revents = 0;
    rc = poll(p, (nfds_t)np, timeout_ms);
    if (rc <= 0)
        return 0;
    if (p[0].revents & POLLIN)
        drain_wake(r);
    if (np == 2 && p[1].revents != 0 && r->conns[0] != NULL) {
        count = 0;
        if (qx_conn_notifications(r->conns[0], &ns, &count, 0, NULL) == QX_OK && count > 0) {
            qx_notify_free(ns, count);
            return 1;
        }
        if (qx_conn_is_broken(r->conns[0]))
            drop_connection(r, 0);
    }
    return 0;
}

/* The seqs of a batch's acked rows, as an array literal for the next claim. Returns 0 when
 * memory ran out. */
static int acked_seqs(const batch *b, buf *seqs)
{
    int i, n = 0;
    buf_str(seqs, "{");
    for (i = 0; i < b->n; i++) {
        if (b->rows[i].state != ROW_ACKED)
            continue;
        if (n++ > 0)
            buf_str(seqs, ",");
        buf_str(seqs, qx_result_value(b->res, i, COL_SEQ));
    }
    buf_str(seqs, "}");
    return !seqs->failed;
}

typedef struct mark_job {
    qx_conn *conn;
    marking *mk;
} mark_job;

static void *mark_thread(void *p)
{
    mark_job *j = p;
    mark_send(j->conn, j->mk);
    return NULL;
}

/* Accounts a finished batch and tells fn; returns 1 when fn asks to stop. */
static int settle(qx_relay *r, batch *b, qx_status q, const qx_error *e, qx_relay_batch_fn fn,
                  void *ud)
{
    if (q == QX_OK)
        account(r, &b->out);
    else
        note_error(r, e);
    return fn != NULL && fn(ud, &b->out, q == QX_OK ? NULL : e) != 0;
}

/* May the next batch be claimed while this one is marked? Only a leader with both connections
 * of a batch that found rows, with NATS up, when no one asked to stop. */
static int may_overlap(qx_relay *r, const batch *cur, int stop, int handle_signals)
{
    return cur->n > 0 && !stop && !stopping(r, handle_signals) && r->leader &&
           r->conns[0] != NULL && !qx_conn_is_broken(r->conns[0]) &&
           qx_nats_get_state(r->nats) == QX_NATS_CONNECTED;
}

/*
 * After a batch that found rows, the relay claims the next batch on its other connection while
 * the first one's marks and COMMIT run on its own (on a thread of the relay's), and starts
 * publishing it before that COMMIT is back: PostgreSQL marks one batch while the relay claims
 * and NATS carries the next.
 *
 * Why this keeps each key's order: the batch being marked still holds its rows locked, so the
 * next claim skips them (SKIP LOCKED), and a skipped row is a gap that holds its key back -
 * except the rows that were acked, whose seqs the claim is told: they are on the stream
 * already, so the next rows of their keys may follow. Failed, held and dead rows stay
 * gaps until their batch commits. Should that COMMIT fail, its acked rows go again later, and
 * JetStream drops the copies by their Nats-Msg-Id, as after a crash between publish and mark.
 *
 * After a batch that found nothing, the relay waits for a NOTIFY (or the idle interval); after
 * one that was not full, at most the poll interval.
 */
qx_status qx_relay_run(qx_relay *r, qx_relay_batch_fn fn, void *ud, int handle_signals,
                       qx_error *err)
{
    struct sigaction sa, old_term, old_int;
    qx_relay_result idle;
    qx_error e, ne;
    batch *cur = NULL;
    int stop_asked = 0, chained = 0; /* chained: cur was claimed while the previous was marked */
    int started = 0;                 /* cur's publishing has begun */

    qx_error_clear(err);
    __atomic_store_n(&r->stop, 0, __ATOMIC_RELEASE);
    drain_wake(r);
    if (handle_signals) {
        signal_stop = 0;
        signal_fd = r->wake[1];
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGTERM, &sa, &old_term);
        sigaction(SIGINT, &sa, &old_int);
    }
    r->stats.running = 1;

    for (;;) {
        batch *next;
        buf seqs = { NULL, 0, 0, 0 };
        mark_job job;
        pthread_t th;
        qx_status q, next_q;
        int wait_ms, threaded;

        if (cur == NULL) {
            if (stopping(r, handle_signals) || stop_asked)
                break;
            memset(&idle, 0, sizeof idle);
            q = ready_to_claim(r, &e);
            if (q == QX_OK && r->leader) {
                cur = &r->slot[0];
                chained = started = 0;
                q = claim(r, cur, NULL, &e);
                if (q != QX_OK)
                    cur = NULL;
            }
            if (cur == NULL) {
                idle.leader = r->leader;
                if (q != QX_OK)
                    note_error(r, &e);
                if (fn != NULL && fn(ud, &idle, q == QX_OK ? NULL : &e))
                    stop_asked = 1;
                if (!stopping(r, handle_signals) && !stop_asked)
                    wait_for_work(r, r->o.lock_retry_ms);
                continue;
            }
        }

        if (cur->n > 0) {
            if (!started)
                publish_start(r, cur);
            publish_wait(r, cur);
        }
        started = 0;

        if (!may_overlap(r, cur, stop_asked, handle_signals)) {
            q = finish(r, cur, &e);
            if (settle(r, cur, q, &e, fn, ud))
                stop_asked = 1;
            /* nothing more: soon again right after work (a retry may come due), later when
             * idle; a NOTIFY cuts both short */
            wait_ms = q != QX_OK ? r->o.lock_retry_ms
                      : (cur->out.claimed > 0 || chained) ? r->o.poll_interval_ms
                      : r->o.idle_interval_ms;
            cur = NULL;
            if (wait_ms > 0 && !stop_asked && !stopping(r, handle_signals))
                wait_for_work(r, wait_ms);
            continue;
        }

        /* mark cur on a thread; meanwhile claim the next batch and start publishing it */
        next = cur == &r->slot[0] ? &r->slot[1] : &r->slot[0];
        q = mark_prepare(r, cur, &e);
        if (q != QX_OK || !acked_seqs(cur, &seqs)) {
            free(seqs.p);
            if (q == QX_OK)
                marking_free(&cur->mk);
            q = finish(r, cur, &e); /* again, in turn: the plain way */
            if (settle(r, cur, q, &e, fn, ud))
                stop_asked = 1;
            cur = NULL;
            continue;
        }
        job.conn = r->conns[cur->ci];
        job.mk = &cur->mk;
        threaded = pthread_create(&th, NULL, mark_thread, &job) == 0;
        if (!threaded)
            mark_send(job.conn, job.mk);
        next_q = claim(r, next, seqs.p, &ne);
        free(seqs.p);
        if (next_q == QX_OK && next->n > 0 && !stopping(r, handle_signals)) {
            publish_start(r, next);
            started = 1;
        }
        if (threaded)
            pthread_join(th, NULL);
        q = mark_complete(r, cur, &e);
        if (settle(r, cur, q, &e, fn, ud))
            stop_asked = 1;
        if (next_q != QX_OK) {
            note_error(r, &ne); /* claim() has given the rows back */
            cur = NULL;
            if (!stop_asked && !stopping(r, handle_signals))
                wait_for_work(r, r->o.lock_retry_ms);
            continue;
        }
        if (stop_asked || stopping(r, handle_signals)) {
            if (started) {
                /* its messages are out: see them acked and marked, then stop */
                publish_wait(r, next);
                q = finish(r, next, &e);
                if (q == QX_OK)
                    account(r, &next->out);
                else
                    note_error(r, &e);
            } else {
                abort_batch(r, next); /* nothing of it was sent: give the rows back */
            }
            break;
        }
        cur = next;
        chained = 1;
    }

    r->stats.running = 0;
    if (handle_signals) {
        sigaction(SIGTERM, &old_term, NULL);
        sigaction(SIGINT, &old_int, NULL);
        signal_fd = -1;
    }
    return QX_OK;
}
