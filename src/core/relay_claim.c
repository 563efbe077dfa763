/* The relay's claim stage: its PostgreSQL connections, the shard lock, and BEGIN + claim. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relay_internal.h"

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

/* one lock per outbox (the schema it lives in) and shard */
static const char LOCK_SQL[] =
    "SELECT pg_try_advisory_lock(hashtext('qx_relay'),"
    "                            hashtext(current_schema() || ' ' || $1))::text";

void relay_drop_connection(qx_relay *r, int k)
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
    qx_result_free(res);
    if (r->leader)
        r->stats.leader_changes++;
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
    relay_set_stmt(&stmts[0], "BEGIN", 0, NULL);
    relay_set_stmt(&stmts[1], CLAIM_SQL, 4, p.values);
    q = qx_conn_batch(r->conns[b->ci], results, &failed, stmts, 2, err);
    if (q != QX_OK) {
        relay_abort_batch(r, b);
        return q;
    }
    qx_result_free(results[0]);
    claimed(b, results[1]);
    return QX_OK;
}
