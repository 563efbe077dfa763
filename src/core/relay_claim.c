/* The relay's claim stage: its PostgreSQL connections, the shard lock, and BEGIN + claim. */
#define _GNU_SOURCE /* POLLRDHUP */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relay_internal.h"

/* Claims pending rows of this shard in commit (seq) order, skipping rows another transaction
 * holds.
 *   claimed: the batch, locked. A row whose key has an earlier row waiting for its next attempt
 *            is held back and takes no place in the batch: one probe of the retry-key index per
 *            row (a LATERAL ... LIMIT 1), skipped when no row waits at all (an uncorrelated
 *            EXISTS: one probe, a one-time filter on every row's subquery). The shard test is a
 *            CASE: the planner takes a CASE to keep half the rows, where it took
 *            `mod(...) = shard` to keep one in 200 and so sorted every pending row of the shard
 *            to take the first batch
 *   lined_up: the batch's keys and seqs, and those of every pending row of this shard up to the
 *            batch's last seq (one range of the pending index). Every claimed row is among those
 *            pending rows too (one statement, one snapshot: the claim takes only rows it saw
 *            pending), right after its claimed twin in (key, seq, claimed first) order
 *   behind_gap: one window pass over that order. A claimed row's pending rows before it are its
 *            earlier claimed rows' twins, and any pending row the batch does not hold (another
 *            transaction locks it, or it waits for a retry): a gap. No gap before it <=> as many
 *            pending rows before it as claimed rows before it. A claimed row after a gap of its
 *            key is left out of the batch (by seq: a <> ALL over those few seqs): that earlier
 *            row holds its key. Keys compare bytewise (COLLATE "C"): only equality matters.
 *            This runs only when the batch is not every pending row of this shard up to its
 *            last seq (one count of that range): as a rule it is, and then no row can have a
 *            gap before it (an InitPlan runs when first needed, and the CASE does not need it
 *            then)
 *   $4:      seqs of rows this relay has published and is marking in a transaction of its other
 *            connection right now: neither claimed nor lined up (see qx_relay_run). They are
 *            locked, and leaving them out by seq (a hashed <> ALL) before the lock is tried
 *            saves a failed row-lock attempt for each of them
 * The cost does not depend on the planner's statistics: an index probe per scanned row, one index
 * range, one sort of the keys and seqs of the batch and that range, and a <> ALL over the few
 * seqs left out. No step joins two sets whose sizes the planner must guess: on an outbox never
 * analysed it guessed one row each, and the anti-join of the batch with the pending rows it used
 * before became a nested loop over both (tens of seconds at a few thousand rows, past the
 * statement timeout, so nothing was published). */
static const char CLAIM_SQL[] =
    "WITH claimed AS ("
    " SELECT o.ctid, o.id, o.seq, o.partition_key, o.event_name, o.event_version, o.payload,"
    "        o.correlation_id, o.tenant_id, o.attempts, o.traceparent, o.tracestate"
    " FROM qx_outbox_events o LEFT JOIN LATERAL ("
    "   SELECT 1 AS held FROM qx_outbox_events r"
    "   WHERE r.partition_key = o.partition_key AND r.seq < o.seq"
    "     AND r.published_at IS NULL AND r.dead_at IS NULL AND r.next_attempt_at > now()"
    "     AND EXISTS (SELECT 1 FROM qx_outbox_events w WHERE w.published_at IS NULL"
    "                 AND w.dead_at IS NULL AND w.next_attempt_at > now())"
    "   LIMIT 1) h ON true"
    " WHERE o.published_at IS NULL AND o.dead_at IS NULL"
    "   AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())"
    "   AND ($2::int = 1 OR CASE WHEN mod(abs(hashtext(coalesce(o.partition_key, o.id::text))"
    "                                    ::bigint), $2::int) = $3::int THEN true ELSE false END)"
    "   AND o.seq <> ALL ($4::int8[])"
    "   AND h.held IS NULL"
    " ORDER BY o.seq LIMIT $1::int"
    " FOR UPDATE OF o SKIP LOCKED),"
    " lined_up AS ("
    " SELECT partition_key, seq, true AS mine FROM claimed WHERE partition_key IS NOT NULL"
    " UNION ALL"
    " SELECT p.partition_key, p.seq, false FROM qx_outbox_events p"
    " WHERE p.published_at IS NULL AND p.dead_at IS NULL AND p.partition_key IS NOT NULL"
    "   AND p.seq <= (SELECT max(seq) FROM claimed)"
    "   AND ($2::int = 1 OR mod(abs(hashtext(p.partition_key)::bigint), $2::int) = $3::int)"
    "   AND p.seq <> ALL ($4::int8[])),"
    " behind_gap AS ("
    " SELECT seq FROM ("
    "   SELECT seq, mine, count(*) FILTER (WHERE NOT mine) OVER w AS pending_before,"
    "          count(*) FILTER (WHERE mine) OVER w AS claimed_to"
    "   FROM lined_up WINDOW w AS (PARTITION BY partition_key COLLATE \"C\" ORDER BY seq, mine DESC"
    "                              ROWS UNBOUNDED PRECEDING)) x"
    " WHERE mine AND pending_before <> claimed_to - 1)"
    " SELECT c.id::text, c.event_name, c.event_version::text, c.payload::text,"
    "        jsonb_typeof(c.payload), c.correlation_id::text, c.tenant_id::text,"
    "        c.partition_key, c.attempts::text, c.seq::text, c.ctid::text, c.traceparent,"
    "        c.tracestate"
    " FROM claimed c"
    " WHERE c.seq <> ALL (CASE WHEN (SELECT count(*) FROM claimed) = ("
    "   SELECT count(*) FROM qx_outbox_events p"
    "   WHERE p.published_at IS NULL AND p.dead_at IS NULL"
    "     AND p.seq <= (SELECT max(seq) FROM claimed)"
    "     AND ($2::int = 1 OR mod(abs(hashtext(coalesce(p.partition_key, p.id::text))::bigint),"
    "                             $2::int) = $3::int)"
    "     AND p.seq <> ALL ($4::int8[]))"
    "   THEN '{}'::int8[] ELSE ARRAY(SELECT seq FROM behind_gap) END)"
    " ORDER BY c.seq";

/* one lock per outbox (the schema it lives in) and shard; the session's pid for the fence */
static const char LOCK_SQL[] =
    "SELECT pg_try_advisory_lock(hashtext('qx_relay'),"
    "                            hashtext(current_schema() || ' ' || $1))::text,"
    "       pg_backend_pid()::text";

/* The fence: a transaction of the relay's other connection goes on only while the lock session
 * ($1, its backend pid) holds the shard's lock ($2, the lock's name), as the server sees it: a
 * session that ended has released it, and a standby may hold it already. Otherwise the
 * statement fails (a text that is not an integer), and the transaction with it: nothing is
 * claimed or marked under a lock this relay no longer holds. */
const char relay_fence_sql[] =
    "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_locks"
    "   WHERE locktype = 'advisory' AND granted AND pid = $1::int AND objsubid = 2"
    "     AND classid = hashtext('qx_relay')::oid"
    "     AND objid = hashtext(current_schema() || ' ' || $2)::oid)"
    " THEN 1 ELSE set_config('qx.relay_fence', 'the shard lock is gone', true)::int END";

qx_status relay_lock_gone(qx_relay *r, qx_error *err)
{
    if (!r->lock_lost)
        r->lock_lost_unreported = 1;
    r->lock_lost = 1;
    return qx_error_set(err, QX_ERR_CONFLICT,
                        "relay: the shard lock is gone (its database session ended): nothing"
                        " of this batch is marked; its rows go again");
}

int relay_fence_failed(const qx_error *err)
{
    return strcmp(err->sqlstate, "22P02") == 0 && strstr(err->message, "shard lock") != NULL;
}

int relay_lock_session_gone(qx_relay *r)
{
    struct pollfd p;
    if (r->lock_lost || r->lock_fd < 0)
        return 1;
    p.fd = r->lock_fd;
    p.events = POLLRDHUP;
    p.revents = 0;
    if (poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))) {
        if (!r->lock_lost)
            r->lock_lost_unreported = 1;
        r->lock_lost = 1;
        return 1;
    }
    return 0;
}

void relay_drop_connection(qx_relay *r, int k)
{
    if (k == 0) {
        if (r->leader) {
            r->stats.leader_changes++;
            if (!r->lock_lost) /* else told already */
                r->lock_lost_unreported = 1; /* the session that held the lock is gone */
        }
        r->leader = 0;
        r->lock_fd = -1;
        r->lock_pid[0] = '\0';
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
        relay_drop_connection(r, k);
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
        relay_drop_connection(r, k);
    return q;
}

qx_status relay_ensure_leader(qx_relay *r, qx_error *err)
{
    qx_result *res = NULL;
    const char *params[1];
    qx_status q;

    if (r->lock_lost && r->conns[0] != NULL)
        relay_drop_connection(r, 0); /* whatever is left of the session that held the lock */
    if ((q = ensure_connection(r, 0, err)) != QX_OK)
        return q;
    if (r->leader)
        return QX_OK;
    params[0] = r->lock_name;
    q = qx_conn_exec(r->conns[0], &res, LOCK_SQL, 1, params, NULL, err);
    if (q != QX_OK) {
        if (qx_conn_is_broken(r->conns[0]))
            relay_drop_connection(r, 0);
        return q;
    }
    r->leader = qx_result_nrows(res) == 1 && strcmp(qx_result_value(res, 0, 0), "true") == 0;
    if (r->leader) {
        snprintf(r->lock_pid, sizeof r->lock_pid, "%s", qx_result_value(res, 0, 1));
        r->lock_fd = qx_conn_socket(r->conns[0]);
        r->lock_lost = r->lock_lost_unreported = 0;
        r->stats.leader_changes++;
    } else {
        r->lock_lost = 0; /* a standby now: nothing to fence */
    }
    qx_result_free(res);
    return QX_OK;
}

void relay_abort_batch(qx_relay *r, batch *b)
{
    qx_result_free(b->res);
    b->res = NULL;
    b->n = 0;
    if (r->conns[b->ci] == NULL)
        return;
    if (qx_conn_is_broken(r->conns[b->ci]) ||
        qx_conn_script(r->conns[b->ci], "ROLLBACK", NULL) != QX_OK)
        relay_drop_connection(r, b->ci);
}
void relay_set_stmt(qx_stmt *st, const char *sql, int n, const char *const *values)
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

qx_status relay_claim(qx_relay *r, batch *b, const char *seqs, qx_error *err)
{
    qx_stmt stmts[3];
    qx_result *results[3] = { NULL, NULL, NULL };
    const char *fence[2];
    claim_params p;
    int failed = -1, n = 0, i;
    qx_status q;

    memset(&b->out, 0, sizeof b->out);
    b->n = 0;
    if (r->lock_lost)
        return relay_lock_gone(r, err);
    if (b->ci == 0 && (!r->leader || r->conns[0] == NULL || qx_conn_is_broken(r->conns[0]))) {
        /* a new session there would not hold the lock: relay_ensure_leader takes it first */
        if (r->conns[0] != NULL)
            relay_drop_connection(r, 0);
        return qx_error_set(err, QX_ERR_CONNECTION,
                            "relay: the lock session's connection is lost");
    }
    if ((q = ensure_connection(r, b->ci, err)) != QX_OK)
        return q;
    claim_params_init(r, &p, seqs);
    relay_set_stmt(&stmts[n++], "BEGIN", 0, NULL);
    if (b->ci != 0) {
        /* conns[0]'s own claims need no fence: that session holds the lock while it lives */
        fence[0] = r->lock_pid;
        fence[1] = r->lock_name;
        relay_set_stmt(&stmts[n++], relay_fence_sql, 2, fence);
    }
    relay_set_stmt(&stmts[n++], CLAIM_SQL, 4, p.values);
    q = qx_conn_batch(r->conns[b->ci], results, &failed, stmts, n, err);
    if (q != QX_OK) {
        relay_abort_batch(r, b);
        if (b->ci != 0 && failed == 1 && relay_fence_failed(err))
            q = relay_lock_gone(r, err);
        return q;
    }
    for (i = 0; i < n - 1; i++)
        qx_result_free(results[i]);
    claimed(b, results[n - 1]);
    return QX_OK;
}
