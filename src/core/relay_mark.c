/* The relay's mark stage: one round trip marks a published batch's acked rows published (or
 * deletes them), its failed rows failed or dead, and commits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relay_internal.h"

/* by the rows' physical addresses (a TID scan, no index lookups): the batch's transaction has
 * held these rows locked since the claim, so they cannot have moved */
static const char MARK_PUBLISHED_SQL[] =
    "UPDATE qx_outbox_events SET published_at = now(), next_attempt_at = NULL"
    " WHERE ctid = ANY($1::tid[]) AND published_at IS NULL";

/* with delete_published: the stream is the record, and a DELETE writes far less than an UPDATE
 * (no new row version, no index entries) */
static const char DELETE_PUBLISHED_SQL[] =
    "DELETE FROM qx_outbox_events WHERE ctid = ANY($1::tid[]) AND published_at IS NULL";

/* the error, the next attempt after base * 2^attempts (at most max), and, for a failure of the
 * message's own (f.counts), attempts + 1 and the dead-letter time when the row cannot be sent
 * or has failed max_attempts times; a failure of the transport counts nothing */
static const char MARK_FAILED_SQL[] =
    "UPDATE qx_outbox_events o SET attempts = o.attempts + f.counts::int,"
    " last_error = left(f.error, 2048),"
    " next_attempt_at = CASE WHEN f.dead OR (f.counts AND $4::int > 0 AND o.attempts + 1 >= $4::int)"
    "   THEN NULL ELSE now() + make_interval(secs => least($6::float8,"
    "   $5::float8 * power(2, least(o.attempts, 30))) / 1000.0) END,"
    " dead_at = CASE WHEN f.dead OR (f.counts AND $4::int > 0 AND o.attempts + 1 >= $4::int)"
    "   THEN now() END"
    " FROM unnest($1::uuid[], $2::text[], $3::bool[], $7::bool[]) AS f(id, error, dead, counts)"
    " WHERE o.id = f.id AND o.published_at IS NULL AND o.dead_at IS NULL";

/* The first QX_RELAY_FAILURES_MAX failures of a batch, for the log; the rest are counted. */
static void relay_note_failure(qx_relay_result *out, const char *id, const char *error,
                               int state)
{
    qx_relay_failure *f;
    if (out->nfailures >= QX_RELAY_FAILURES_MAX)
        return;
    f = &out->failures[out->nfailures++];
    snprintf(f->event_id, sizeof f->event_id, "%s", id);
    snprintf(f->error, sizeof f->error, "%s", error);
    f->counted = state != ROW_RETRY;
    f->dead = state == ROW_DEAD;
}

void relay_marking_free(marking *mk)
{
    int i;
    for (i = 0; i < mk->nstmts; i++) {
        qx_result_free(mk->results[i]);
        mk->results[i] = NULL;
    }
    qx_buf_free(&mk->acked);
    qx_buf_free(&mk->ids);
    qx_buf_free(&mk->errors);
    qx_buf_free(&mk->dead);
    qx_buf_free(&mk->counts);
    memset(mk, 0, sizeof *mk);
}

/* Builds the statements that mark a published batch's outcome, then COMMIT. Counts the outcome
 * into b->out. Returns QX_ERR_NOMEM (and frees what it built) when memory ran out. */
qx_status relay_mark_prepare(qx_relay *r, batch *b, qx_error *err)
{
    marking *mk = &b->mk;
    qx_relay_result *out = &b->out;
    int nacked = 0, nfailed = 0, i;

    memset(mk, 0, sizeof *mk);
    mk->failed_idx = -1;
    mk->fence_idx = -1;
    out->published = out->failed = out->retried = out->dead_lettered = out->held = 0; /* here */
    out->nfailures = 0;
    qx_buf_append_str(&mk->acked, "{");
    qx_buf_append_str(&mk->ids, "{");
    qx_buf_append_str(&mk->errors, "{");
    qx_buf_append_str(&mk->dead, "{");
    qx_buf_append_str(&mk->counts, "{");
    for (i = 0; i < b->n; i++) {
        row *w = &b->rows[i];
        const char *id = qx_result_value(b->res, i, COL_ID);
        switch (w->state) {
        case ROW_ACKED:
            if (nacked++ > 0)
                qx_buf_append_str(&mk->acked, ",");
            qx_buf_append_quoted(&mk->acked, qx_result_value(b->res, i, COL_CTID)); /* "(p,i)" */
            out->published++;
            break;
        case ROW_FAILED:
        case ROW_RETRY:
        case ROW_DEAD:
            if (nfailed++ > 0) {
                qx_buf_append_str(&mk->ids, ",");
                qx_buf_append_str(&mk->errors, ",");
                qx_buf_append_str(&mk->dead, ",");
                qx_buf_append_str(&mk->counts, ",");
            }
            qx_buf_append_str(&mk->ids, id);
            qx_buf_append_quoted(&mk->errors, w->error);
            qx_buf_append_str(&mk->dead, w->state == ROW_DEAD ? "t" : "f");
            qx_buf_append_str(&mk->counts, w->state == ROW_RETRY ? "f" : "t");
            if (w->state == ROW_DEAD ||
                (w->state == ROW_FAILED && r->o.max_attempts > 0 &&
                 w->attempts + 1 >= r->o.max_attempts))
                out->dead_lettered++;
            else
                out->failed++;
            if (w->state == ROW_RETRY)
                out->retried++;
            relay_note_failure(out, id, w->error, w->state);
            break;
        default:
            out->held++;
            break;
        }
    }
    qx_buf_append_str(&mk->acked, "}");
    qx_buf_append_str(&mk->ids, "}");
    qx_buf_append_str(&mk->errors, "}");
    qx_buf_append_str(&mk->dead, "}");
    qx_buf_append_str(&mk->counts, "}");
    if (mk->acked.failed || mk->ids.failed || mk->errors.failed || mk->dead.failed ||
        mk->counts.failed) {
        relay_marking_free(mk);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    if (b->ci != 0) {
        /* first, in the same transaction: is the lock still held? (copied: the relay's thread
         * may close the lock session while this is sent from another) */
        snprintf(mk->lock_pid, sizeof mk->lock_pid, "%s", r->lock_pid);
        mk->fence_params[0] = mk->lock_pid;
        mk->fence_params[1] = r->lock_name;
        mk->fence_idx = mk->nstmts;
        relay_set_stmt(&mk->stmts[mk->nstmts++], relay_fence_sql, 2, mk->fence_params);
    }
    if (nacked > 0) {
        mk->pub_params[0] = mk->acked.p;
        relay_set_stmt(&mk->stmts[mk->nstmts++],
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
        mk->fail_params[6] = mk->counts.p;
        relay_set_stmt(&mk->stmts[mk->nstmts++], MARK_FAILED_SQL, 7, mk->fail_params);
    }
    relay_set_stmt(&mk->stmts[mk->nstmts++], "COMMIT", 0, NULL);
    return QX_OK;
}

/* The round trip: touches nothing but the marking and the batch's connection, so it may run on
 * another thread while that connection is not used elsewhere. */
void relay_mark_send(qx_conn *conn, marking *mk)
{
    mk->q = qx_conn_batch(conn, mk->results, &mk->failed_idx, mk->stmts, mk->nstmts, &mk->err);
}

/* Takes the outcome of mark_send: on success the batch's slot is free; on failure the
 * transaction is rolled back (the published rows stay pending and go again: JetStream drops
 * the copies) and its error is in err. */
qx_status relay_mark_complete(qx_relay *r, batch *b, qx_error *err)
{
    marking *mk = &b->mk;
    qx_status q = mk->q;

    if (q == QX_OK) {
        qx_result_free(b->res);
        b->res = NULL;
    } else {
        *err = mk->err;
        relay_abort_batch(r, b);
        if (mk->fence_idx >= 0 && mk->failed_idx == mk->fence_idx && relay_fence_failed(err))
            q = relay_lock_gone(r, err);
    }
    relay_marking_free(mk);
    if (q != QX_OK) {
        int claimed_n = b->out.claimed;
        memset(&b->out, 0, sizeof b->out);
        b->out.claimed = claimed_n;
        b->out.leader = r->leader;
    }
    return q;
}

qx_status relay_finish(qx_relay *r, batch *b, qx_error *err)
{
    qx_status q = relay_mark_prepare(r, b, err);
    if (q != QX_OK) {
        relay_abort_batch(r, b);
        memset(&b->out, 0, sizeof b->out);
        b->out.leader = r->leader;
        return q;
    }
    if (r->conns[b->ci] == NULL) {
        /* cannot happen while a batch is claimed: its connection holds the transaction */
        b->mk.q = qx_error_set(&b->mk.err, QX_ERR_CONNECTION, "relay: connection lost");
    } else {
        relay_mark_send(r->conns[b->ci], &b->mk);
    }
    return relay_mark_complete(r, b, err);
}

/* The seqs of a batch's acked rows, as an array literal for the next claim. Returns 0 when
 * memory ran out. */
int relay_acked_seqs(const batch *b, qx_buf *seqs)
{
    int i, n = 0;
    qx_buf_append_str(seqs, "{");
    for (i = 0; i < b->n; i++) {
        if (b->rows[i].state != ROW_ACKED)
            continue;
        if (n++ > 0)
            qx_buf_append_str(seqs, ",");
        qx_buf_append_str(seqs, qx_result_value(b->res, i, COL_SEQ));
    }
    qx_buf_append_str(seqs, "}");
    return !seqs->failed;
}

