/*
 * One transaction on a leased connection: the queue, the pipeline, savepoints, commit.
 *
 * Statements are queued into storage the tx owns (their SQL and parameter texts copied into one
 * growing arena) and leave together with the next read, flush or the commit, as one pipeline of
 * qx_conn_batch: one round trip. A commit sends the queue, COMMIT and the wake-up of listeners
 * together; a transaction that has sent nothing and needs no block sends its queue alone, as the
 * implicit transaction a pipeline runs in (it commits at the Sync, or not at all).
 *
 * The wake-up goes after the COMMIT, in a transaction of its own that does not wait for its
 * commit record to reach the disk: a NOTIFY inside the transaction would take the cluster-wide
 * lock that keeps the notification queue in commit order and hold it through the WAL flush, so
 * notifying writers would stop sharing flushes (figures in bench/RESULTS.md). After the COMMIT,
 * in the same round trip, the lock is held only for an in-memory commit; a listener is woken once
 * the rows are committed, and if the COMMIT fails the server skips the rest of the pipeline.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qx.h"

/* A queued statement: offsets into the arena. Each parameter there is an int length (-1: SQL
 * NULL) followed by its bytes and a NUL. */
typedef struct entry {
    size_t sql;
    size_t params;
    int nparams;
} entry;

/* statements a send adds after the queue, at most: the xid and timeline, COMMIT, the wake-up */
#define TAIL_MAX 3

typedef struct savepoint {
    int number;        /* qx_sp_<number> */
    int queue_at;      /* the queue's length before its SAVEPOINT */
    long long sends_at; /* sends made before it */
} savepoint;

/* A call whose pipeline waits in the wire codec (QX_PENDING): what finishing it needs. */
enum { OP_NONE, OP_QUERY, OP_FLUSH, OP_ROLLBACK_TO, OP_COMMIT, OP_ROLLBACK };

typedef struct pending {
    int op;
    int kept, first_tail, ntail; /* of the send (see send_end) */
    /* the commit's */
    int nchannels, commit_at, broken_before;
    /* rollback_to's */
    int had_failure;
    qx_error before;
} pending;

struct qx_tx {
    qx_conn *c;       /* the connection, or NULL over a wire codec */
    qx_wire *w;
    pending pend;
    qx_tx_state state;
    qx_error failure;     /* the first failure, while state is QX_TXS_FAILED */
    int block;            /* needs BEGIN ... COMMIT */
    long long sends;      /* sends attempted; > 0: the transaction has begun */
    long long round_trips;
    char timeout[16];     /* "" or the statement_timeout parameter */

    entry *q;
    int nq;
    size_t capq;
    char *arena;
    size_t used, cap;
    int reset_arena;      /* the arena holds the last pipeline's texts until the next append */

    int poison_at;        /* index of a statement that could not be made, -1 */
    qx_error poison;

    savepoint *sp;
    int nsp, capsp, sp_counter;

    /* what a send builds, kept for the next one */
    qx_stmt *stmts;
    qx_result **results;
    const char **values;
    int *lengths;
    size_t caps, capv;
    int nlast;            /* statements of the last pipeline (stmts[0..nlast-1]) */

    char *notify_sql;
    size_t notify_cap;

    int keep;             /* a send keeps the id's result (tx->kept), also on failure */
    int id_at;            /* index in the queue of a statement that reads the id, -1 */
    qx_result *kept;
    char xid[24];         /* learned by the commit: "" when unknown */
    char timeline[12];

    /* what most transactions need, without a malloc of its own */
    entry q_local[8];
    qx_stmt stmts_local[8];
    qx_result *results_local[8];
    const char *values_local[32];
    int lengths_local[32];
    char arena_local[1024];
};

/* Grows the array *p (n elements of size elem, first held in local) to hold at least need. */
static int grow(void **p, void *local, size_t elem, size_t n, size_t need, size_t *cap)
{
    size_t c = *cap;
    void *q;
    while (c < need)
        c *= 2;
    if (*p == local) {
        q = malloc(elem * c);
        if (q != NULL)
            memcpy(q, local, elem * n);
    } else {
        q = realloc(*p, elem * c);
    }
    if (q == NULL)
        return 0;
    *p = q;
    *cap = c;
    return 1;
}

static const char BEGIN_SQL[] = "BEGIN";
static const char COMMIT_SQL[] = "COMMIT";
static const char ROLLBACK_SQL[] = "ROLLBACK";
static const char TIMEOUT_SQL[] = "SELECT set_config('statement_timeout', $1, true)";

void qx_tx_options_init(qx_tx_options *o)
{
    o->timeout_ms = -1;
}

qx_status qx_tx_new(qx_tx **out, qx_conn *c, const qx_tx_options *o, qx_error *err)
{
    qx_tx *tx;
    *out = NULL;
    if (c == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "connection is closed");
    /* not calloc: the two error buffers are written only when used (one per transaction) */
    tx = malloc(sizeof *tx);
    if (tx == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    tx->c = c;
    tx->w = NULL;
    tx->pend.op = OP_NONE;
    tx->state = QX_TXS_ACTIVE;
    tx->block = 0;
    tx->sends = tx->round_trips = 0;
    tx->timeout[0] = '\0';
    if (o != NULL && o->timeout_ms >= 0)
        snprintf(tx->timeout, sizeof tx->timeout, "%d", o->timeout_ms);
    tx->q = tx->q_local;
    tx->nq = 0;
    tx->capq = 8;
    tx->arena = tx->arena_local;
    tx->used = 0;
    tx->cap = sizeof tx->arena_local;
    tx->reset_arena = 0;
    tx->poison_at = -1;
    tx->sp = NULL;
    tx->nsp = tx->capsp = tx->sp_counter = 0;
    tx->stmts = tx->stmts_local;
    tx->results = tx->results_local;
    tx->caps = 8;
    tx->values = tx->values_local;
    tx->lengths = tx->lengths_local;
    tx->capv = 32;
    tx->nlast = 0;
    tx->notify_sql = NULL;
    tx->notify_cap = 0;
    tx->keep = 0;
    tx->id_at = -1;
    tx->kept = NULL;
    tx->xid[0] = tx->timeline[0] = '\0';
    *out = tx;
    return QX_OK;
}

qx_status qx_tx_new_wire(qx_tx **out, qx_wire *w, const qx_tx_options *o, qx_error *err)
{
    qx_status s;
    *out = NULL;
    if (w == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "connection is closed");
    /* a non-NULL stand-in: qx_tx_new checks for a connection */
    s = qx_tx_new(out, (qx_conn *)(void *)w, o, err);
    if (s == QX_OK) {
        (*out)->c = NULL;
        (*out)->w = w;
    }
    return s;
}

static int conn_broken(const qx_tx *tx)
{
    return tx->w != NULL ? qx_wire_is_broken(tx->w) : qx_conn_is_broken(tx->c);
}

static qx_tx_status conn_status(const qx_tx *tx)
{
    return tx->w != NULL ? qx_wire_tx_status(tx->w) : qx_conn_tx_status(tx->c);
}

void qx_tx_free(qx_tx *tx)
{
    if (tx == NULL)
        return;
    if (tx->pend.op != OP_NONE) {
        /* the codec writes into results: end its batch before they go, and free what it made
         * (all of it when the reply had come, what completed when it is kept) */
        int failed, i;
        qx_wire_lost(tx->w, "the transaction was closed while waiting for its reply");
        qx_wire_batch_end(tx->w, &failed, NULL);
        for (i = 0; i < tx->nlast; i++)
            qx_result_free(tx->results[i]);
    }
    if (tx->q != tx->q_local)
        free(tx->q);
    if (tx->arena != tx->arena_local)
        free(tx->arena);
    if (tx->stmts != tx->stmts_local)
        free(tx->stmts);
    if (tx->results != tx->results_local)
        free(tx->results);
    if (tx->values != tx->values_local)
        free(tx->values);
    if (tx->lengths != tx->lengths_local)
        free(tx->lengths);
    free(tx->sp);
    free(tx->notify_sql);
    qx_result_free(tx->kept);
    free(tx);
}

qx_tx_state qx_tx_state_of(const qx_tx *tx) { return tx->state; }
int qx_tx_queued(const qx_tx *tx) { return tx->nq; }
int qx_tx_pending(const qx_tx *tx) { return tx->pend.op != OP_NONE; }

void qx_tx_forget_connection(qx_tx *tx)
{
    tx->pend.op = OP_NONE;
    tx->w = NULL;
    tx->c = NULL;
}
const char *qx_tx_xid(const qx_tx *tx) { return tx->xid; }
const char *qx_tx_timeline(const qx_tx *tx) { return tx->timeline; }
long long qx_tx_round_trips(const qx_tx *tx) { return tx->round_trips; }

int qx_tx_last_sent(const qx_tx *tx, const char **texts, int max)
{
    int i;
    for (i = 0; i < tx->nlast && i < max; i++)
        texts[i] = tx->stmts[i].sql;
    return tx->nlast;
}

/* The error a finished or failed transaction answers every call with. */
static qx_status refused(const qx_tx *tx, qx_error *err)
{
    if (tx->pend.op != OP_NONE)
        return qx_error_set(err, QX_ERR_INVALID,
                            "the transaction waits for its reply (qx_tx_resume first)");
    if (tx->state == QX_TXS_FAILED) {
        if (err != NULL)
            *err = tx->failure;
        return tx->failure.status;
    }
    return qx_error_set(err, QX_ERR_CLOSED, "transaction is %s",
                        tx->state == QX_TXS_COMMITTED ? "committed" : "rolled back");
}

static void fail(qx_tx *tx, const qx_error *e)
{
    tx->state = QX_TXS_FAILED;
    tx->failure = *e;
}

/* ---- the queue --------------------------------------------------------------------------- */

static int arena_reserve(qx_tx *tx, size_t n)
{
    if (tx->reset_arena) {
        tx->used = 0;
        tx->reset_arena = 0;
    }
    if (tx->used + n > tx->cap)
        return grow((void **)&tx->arena, tx->arena_local, 1, tx->used, tx->used + n, &tx->cap);
    return 1;
}

static size_t arena_put(qx_tx *tx, const char *s, size_t n)
{
    size_t at = tx->used;
    memcpy(tx->arena + at, s, n);
    tx->arena[at + n] = '\0';
    tx->used += n + 1;
    return at;
}

/* LOCK, DECLARE, SAVEPOINT and RELEASE run only inside BEGIN ... COMMIT, not in the implicit
 * transaction of a pipeline. */
static int needs_block(const char *sql)
{
    static const char *const words[] = { "LOCK", "DECLARE", "SAVEPOINT", "RELEASE" };
    char w[10];
    size_t n = 0, i;
    while (*sql == ' ' || *sql == '\t' || *sql == '\n' || *sql == '\r')
        sql++;
    while (n < sizeof w - 1 && ((*sql >= 'a' && *sql <= 'z') || (*sql >= 'A' && *sql <= 'Z')))
        w[n++] = (char)(*sql++ & ~0x20);
    if ((*sql >= 'a' && *sql <= 'z') || (*sql >= 'A' && *sql <= 'Z'))
        return 0;
    w[n] = '\0';
    for (i = 0; i < sizeof words / sizeof words[0]; i++)
        if (strcmp(w, words[i]) == 0)
            return 1;
    return 0;
}

static qx_status push(qx_tx *tx, const qx_stmt *s, qx_error *err)
{
    size_t sqllen = strlen(s->sql), need = sqllen + 1;
    int i;
    entry *e;

    for (i = 0; i < s->nparams; i++) {
        const char *v = s->values[i];
        size_t len = v == NULL ? 0 : s->lengths ? (size_t)s->lengths[i] : strlen(v);
        need += sizeof(int) + len + 1;
    }
    if ((size_t)tx->nq == tx->capq &&
        !grow((void **)&tx->q, tx->q_local, sizeof *tx->q, (size_t)tx->nq, (size_t)tx->nq + 1,
              &tx->capq))
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    if (!arena_reserve(tx, need))
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    e = &tx->q[tx->nq];
    e->sql = arena_put(tx, s->sql, sqllen);
    e->params = tx->used;
    e->nparams = s->nparams;
    for (i = 0; i < s->nparams; i++) {
        const char *v = s->values[i];
        int len = v == NULL ? -1 : s->lengths ? s->lengths[i] : (int)strlen(v);
        memcpy(tx->arena + tx->used, &len, sizeof len);
        tx->used += sizeof len;
        if (len >= 0)
            arena_put(tx, v, (size_t)len);
    }
    tx->nq++;
    if (!tx->block && needs_block(s->sql))
        tx->block = 1;
    return QX_OK;
}

qx_status qx_tx_queue(qx_tx *tx, const qx_stmt *s, qx_error *err)
{
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, err);
    return push(tx, s, err);
}

qx_status qx_tx_queue_id(qx_tx *tx, const qx_stmt *s, qx_error *err)
{
    qx_status st;
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, err);
    st = push(tx, s, err);
    if (st == QX_OK)
        tx->id_at = tx->nq - 1;
    return st;
}

qx_status qx_tx_queue_failure(qx_tx *tx, const qx_error *why)
{
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, NULL);
    if (tx->poison_at < 0) {
        tx->poison_at = tx->nq;
        tx->poison = *why;
    }
    return why->status;
}

/* ---- sending ----------------------------------------------------------------------------- */

static int room(qx_tx *tx, int nstmts, int nvalues)
{
    if ((size_t)nstmts > tx->caps) {
        size_t cap = tx->caps;
        /* nothing in them is kept from one send to the next: no copy needed, but grow copies */
        if (!grow((void **)&tx->stmts, tx->stmts_local, sizeof *tx->stmts, 0, (size_t)nstmts,
                  &cap))
            return 0;
        cap = tx->caps;
        if (!grow((void **)&tx->results, tx->results_local, sizeof *tx->results, 0,
                  (size_t)nstmts, &cap))
            return 0;
        tx->caps = cap;
    }
    if ((size_t)nvalues > tx->capv) {
        size_t cap = tx->capv;
        if (!grow((void **)&tx->values, tx->values_local, sizeof *tx->values, 0, (size_t)nvalues,
                  &cap))
            return 0;
        cap = tx->capv;
        if (!grow((void **)&tx->lengths, tx->lengths_local, sizeof *tx->lengths, 0,
                  (size_t)nvalues, &cap))
            return 0;
        tx->capv = cap;
    }
    return 1;
}

/* Sends [BEGIN] [timeout] (the first time), the queue and tail[0..ntail-1] in one pipeline.
 * implicit: no BEGIN (the pipeline is the whole transaction). out: the last tail statement's
 * result. On failure, *tail_failed is the index in tail of the statement that failed (negative:
 * one before the tail; ntail: the failure is tied to none). With tx->keep, the result of the
 * statement that reads the id (the queue's at id_at, else tail[0]) goes to tx->kept, also when a
 * later statement failed. Any failure poisons the transaction. Over a wire codec the pipeline is
 * queued there and this returns QX_PENDING (op: the call to finish); send_end finishes it. */
static qx_status send_end(qx_tx *tx, qx_status s, int failed, qx_error *e, qx_result **out,
                          int *tail_failed, qx_error *err);

static qx_status send(qx_tx *tx, int op, int implicit, const qx_stmt *tail, int ntail,
                      qx_result **out, int *tail_failed, qx_error *err)
{
    int begun = tx->sends > 0, n = 0, nv = 0, i, k, failed = -1, first_queued;
    size_t at[TAIL_MAX];
    qx_status s;
    qx_error e;

    if (out != NULL)
        *out = NULL;
    if (tail_failed != NULL)
        *tail_failed = -1;
    tx->sends++;
    if (tx->poison_at >= 0) {
        /* nothing of this send leaves: a statement in it could not be made */
        fail(tx, &tx->poison);
        tx->poison_at = -1;
        tx->nq = 0;
        tx->id_at = -1;
        tx->reset_arena = 1;
        tx->nlast = 0;
        if (err != NULL)
            *err = tx->failure;
        return tx->failure.status;
    }
    for (i = 0; i < ntail; i++)
        nv += tail[i].nparams;
    for (i = 0; i < tx->nq; i++)
        nv += tx->q[i].nparams;
    if (!room(tx, tx->nq + ntail + 2, nv + 1)) {
        qx_error_set(&e, QX_ERR_NOMEM, "out of memory");
        goto failed;
    }
    if (!begun) {
        if (!implicit)
            tx->stmts[n++] = (qx_stmt){ BEGIN_SQL, 0, NULL, NULL };
        if (tx->timeout[0] != '\0') {
            tx->values[nv] = tx->timeout;
            tx->lengths[nv] = (int)strlen(tx->timeout);
            tx->stmts[n++] = (qx_stmt){ TIMEOUT_SQL, 1, tx->values + nv, tx->lengths + nv };
        }
    }
    /* the tail's texts are kept with the queue's, for qx_tx_last_sent (a caller may have made
     * one on its stack) */
    for (i = 0; i < ntail; i++) {
        size_t len = strlen(tail[i].sql);
        if (!arena_reserve(tx, len + 1)) {
            qx_error_set(&e, QX_ERR_NOMEM, "out of memory");
            goto failed;
        }
        at[i] = arena_put(tx, tail[i].sql, len);
    }
    first_queued = n;
    for (i = 0, k = 0; i < tx->nq; i++) {
        const entry *q = &tx->q[i];
        const char *p = tx->arena + q->params;
        int j;
        qx_stmt *st = &tx->stmts[n++];
        st->sql = tx->arena + q->sql;
        st->nparams = q->nparams;
        st->values = tx->values + k;
        st->lengths = tx->lengths + k;
        for (j = 0; j < q->nparams; j++, k++) {
            int len;
            memcpy(&len, p, sizeof len);
            p += sizeof len;
            if (len < 0) {
                tx->values[k] = NULL;
                tx->lengths[k] = 0;
            } else {
                tx->values[k] = p;
                tx->lengths[k] = len;
                p += len + 1;
            }
        }
    }
    tx->pend.first_tail = n;
    tx->pend.ntail = ntail;
    for (i = 0; i < ntail; i++) {
        tx->stmts[n] = tail[i];
        tx->stmts[n++].sql = tx->arena + at[i];
    }
    tx->pend.kept = tx->id_at >= 0 ? first_queued + tx->id_at : tx->pend.first_tail;
    tx->nq = 0;
    tx->id_at = -1;
    tx->reset_arena = 1;
    tx->nlast = n;
    tx->round_trips++;
    if (tx->w != NULL) {
        for (i = 0; i < n; i++)
            tx->results[i] = NULL;
        s = qx_wire_batch(tx->w, tx->results, tx->stmts, n, tx->keep, &e);
        if (s == QX_OK) {
            tx->pend.op = op;
            return QX_PENDING;
        }
    } else if (tx->keep) {
        s = qx_conn_batch_keep(tx->c, tx->results, &failed, tx->stmts, n, &e);
    } else {
        s = qx_conn_batch(tx->c, tx->results, &failed, tx->stmts, n, &e);
    }
    return send_end(tx, s, failed, &e, out, tail_failed, err);

failed:
    tx->nq = 0;
    tx->id_at = -1;
    tx->reset_arena = 1;
    fail(tx, &e);
    if (err != NULL)
        *err = e;
    return e.status;
}

/* What follows the batch of a send: its status s, the failing statement and error e. */
static qx_status send_end(qx_tx *tx, qx_status s, int failed, qx_error *e, qx_result **out,
                          int *tail_failed, qx_error *err)
{
    int n = tx->nlast, i;
    if (tx->keep) {
        tx->kept = tx->results[tx->pend.kept];
        tx->results[tx->pend.kept] = NULL;
    }
    if (s != QX_OK) {
        if (tx->keep)
            for (i = 0; i < n; i++)
                qx_result_free(tx->results[i]);
        if (tail_failed != NULL)
            *tail_failed = failed >= 0 ? failed - tx->pend.first_tail : tx->pend.ntail;
        fail(tx, e);
        if (err != NULL)
            *err = *e;
        return e->status;
    }
    for (i = 0; i < n - 1; i++)
        qx_result_free(tx->results[i]);
    if (out != NULL)
        *out = tx->results[n - 1];
    else
        qx_result_free(tx->results[n - 1]);
    return QX_OK;
}

qx_status qx_tx_query(qx_tx *tx, qx_result **out, const qx_stmt *s, qx_error *err)
{
    *out = NULL;
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, err);
    return send(tx, OP_QUERY, 0, s, 1, out, NULL, err);
}

qx_status qx_tx_flush(qx_tx *tx, qx_error *err)
{
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, err);
    if (tx->nq == 0 && tx->sends > 0 && tx->poison_at < 0)
        return QX_OK;
    return send(tx, OP_FLUSH, 0, NULL, 0, NULL, NULL, err);
}

/* ---- savepoints -------------------------------------------------------------------------- */

static qx_status queue_text(qx_tx *tx, const char *fmt, int number, qx_error *err)
{
    char sql[64];
    qx_stmt s = { sql, 0, NULL, NULL };
    snprintf(sql, sizeof sql, fmt, number);
    return push(tx, &s, err);
}

qx_status qx_tx_savepoint(qx_tx *tx, qx_error *err)
{
    savepoint *sp;
    qx_status s;
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, err);
    if (tx->nsp == tx->capsp) {
        int cap = tx->capsp ? tx->capsp * 2 : 4;
        savepoint *a = realloc(tx->sp, sizeof *a * (size_t)cap);
        if (a == NULL)
            return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        tx->sp = a;
        tx->capsp = cap;
    }
    sp = &tx->sp[tx->nsp];
    sp->number = ++tx->sp_counter;
    sp->queue_at = tx->nq;
    sp->sends_at = tx->sends;
    s = queue_text(tx, "SAVEPOINT qx_sp_%d", sp->number, err);
    if (s == QX_OK)
        tx->nsp++;
    return s;
}

qx_status qx_tx_release(qx_tx *tx, qx_error *err)
{
    savepoint *sp;
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, err);
    if (tx->nsp == 0)
        return qx_error_set(err, QX_ERR_INVALID, "no savepoint to release");
    sp = &tx->sp[--tx->nsp];
    if (tx->sends == sp->sends_at) {
        /* its SAVEPOINT never left: released before anything was sent, it can never be rolled
         * back to, and a failure among its statements fails the transaction with or without
         * it. So it goes, and no RELEASE follows (a savepoint per message of a batch is then
         * free while the handlers only queue). */
        memmove(&tx->q[sp->queue_at], &tx->q[sp->queue_at + 1],
                sizeof *tx->q * (size_t)(tx->nq - sp->queue_at - 1));
        tx->nq--;
        if (tx->poison_at > sp->queue_at)
            tx->poison_at--;
        if (tx->id_at > sp->queue_at)
            tx->id_at--;
        return QX_OK;
    }
    return queue_text(tx, "RELEASE SAVEPOINT qx_sp_%d", sp->number, err);
}

static qx_status rollback_to_end(qx_tx *tx, qx_status s, qx_error *err)
{
    if (s != QX_OK) {
        /* no savepoint to go back to: what failed was queued before it, or its pipeline never
         * left; the transaction is lost with that first error */
        if (tx->pend.had_failure)
            tx->failure = tx->pend.before;
        return refused(tx, err);
    }
    return QX_OK;
}

qx_status qx_tx_rollback_to(qx_tx *tx, qx_error *err)
{
    savepoint sp;
    qx_error e;
    qx_status s;
    char sql[64];
    qx_stmt st = { sql, 0, NULL, NULL };

    if ((tx->state != QX_TXS_ACTIVE && tx->state != QX_TXS_FAILED) || tx->pend.op != OP_NONE)
        return refused(tx, err);
    if (tx->nsp == 0)
        return qx_error_set(err, QX_ERR_INVALID, "no savepoint to roll back to");
    sp = tx->sp[--tx->nsp];
    if (tx->sends == sp.sends_at) {
        /* the SAVEPOINT never reached the server: forget what was queued since */
        tx->nq = sp.queue_at;
        if (tx->poison_at >= tx->nq)
            tx->poison_at = -1;
        if (tx->id_at >= tx->nq)
            tx->id_at = -1;
        if (tx->state == QX_TXS_FAILED)
            return refused(tx, err);
        return QX_OK;
    }
    tx->pend.had_failure = tx->state == QX_TXS_FAILED;
    tx->pend.before = tx->failure;
    tx->state = QX_TXS_ACTIVE;
    tx->nq = 0;
    tx->id_at = -1;
    tx->poison_at = -1;
    snprintf(sql, sizeof sql, "ROLLBACK TO SAVEPOINT qx_sp_%d", sp.number);
    s = send(tx, OP_ROLLBACK_TO, 0, &st, 1, NULL, NULL, &e);
    if (s == QX_PENDING)
        return s;
    return rollback_to_end(tx, s, err);
}

/* ---- the end ----------------------------------------------------------------------------- */

/* SELECT FROM (SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, ''), ...
 * OFFSET 1) AS s: the executor computes the row OFFSET skips, and the planner keeps volatile
 * calls whose results go unread, so the notifications are sent while the statement returns no
 * row and no column - nothing for the client to parse. */
static const char *notify_sql(qx_tx *tx, int nchannels)
{
    static const char head[] = QX_WAKE_SQL_HEAD;
    static const char end[] = QX_WAKE_SQL_TAIL;
    size_t need = sizeof head + sizeof end + (size_t)nchannels * 32, len;
    int i;
    if (need > tx->notify_cap) {
        char *p = realloc(tx->notify_sql, need);
        if (p == NULL)
            return NULL;
        tx->notify_sql = p;
        tx->notify_cap = need;
    }
    memcpy(tx->notify_sql, head, sizeof head - 1);
    len = sizeof head - 1;
    for (i = 0; i < nchannels; i++)
        len += (size_t)sprintf(tx->notify_sql + len, ", pg_notify($%d, '')", i + 1);
    memcpy(tx->notify_sql + len, end, sizeof end);
    return tx->notify_sql;
}

/* The transaction's id (NULL when it wrote nothing: none was assigned) and the server's
 * timeline (the first 8 hex digits of the current WAL file's name; NULL on a standby, where
 * pg_walfile_name fails), learned just before the COMMIT. */
static const char XID_SQL[] = /* keep in step with QX_TX_ID_COLUMNS */
    "SELECT pg_current_xact_id_if_assigned()::text, CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END";

static void copy_column(char *dst, size_t size, const qx_result *r, int col)
{
    size_t n = 0;
    if (r != NULL && qx_result_nrows(r) >= 1 && qx_result_ncols(r) > col &&
        !qx_result_isnull(r, 0, col)) {
        n = (size_t)qx_result_length(r, 0, col); /* a copy per commit: no snprintf */
        if (n >= size)
            n = size - 1;
        memcpy(dst, qx_result_value(r, 0, col), n);
    }
    dst[n] = '\0';
}

/* What follows the commit's send: s and e its outcome, at the failing tail index. */
static qx_status commit_end(qx_tx *tx, qx_status s, int at, qx_error *e, int *wake_failed,
                            qx_error *err)
{
    int learned = tx->kept != NULL, ntail = tx->pend.ntail;
    tx->keep = 0;
    copy_column(tx->xid, sizeof tx->xid, tx->kept, 0);
    copy_column(tx->timeline, sizeof tx->timeline, tx->kept, 1);
    qx_result_free(tx->kept);
    tx->kept = NULL;
    if (s != QX_OK) {
        if (tx->pend.nchannels > 0 && at == ntail - 1) {
            /* the transaction committed; only the wake-up failed: listeners find the rows when
             * they poll */
            *wake_failed = 1;
            if (err != NULL)
                *err = *e;
        } else if (s == QX_ERR_CONNECTION && !tx->pend.broken_before &&
                   !(learned && tx->xid[0] == '\0') &&
                   !(e->sqlstate[0] != '\0' && at < tx->pend.commit_at)) {
            /* The COMMIT (or, implicit, the Sync that commits) may have reached the server and
             * its reply was lost. Not when it was known broken before anything left, when the
             * transaction wrote nothing (no id), or when the server reported the failure of a
             * statement before the COMMIT: then it never got that far. */
            qx_error u;
            qx_error_set(&u, QX_ERR_UNKNOWN_OUTCOME,
                         "the connection was lost before the reply to the commit came; "
                         "the transaction may have committed: %.800s", e->message);
            fail(tx, &u);
            return refused(tx, err);
        } else {
            if (err != NULL)
                *err = *e;
            return s;
        }
    }
    tx->state = QX_TXS_COMMITTED;
    return QX_OK;
}

qx_status qx_tx_commit(qx_tx *tx, int *wake_failed, const char *const *channels, int nchannels,
                       qx_error *err)
{
    qx_stmt tail[TAIL_MAX];
    int ntail = 0, implicit, at = -1;
    qx_status s;
    qx_error e;

    *wake_failed = 0;
    if (tx->state != QX_TXS_ACTIVE || tx->pend.op != OP_NONE)
        return refused(tx, err);
    if (tx->sends == 0 && tx->nq == 0 && tx->poison_at < 0) {
        tx->state = QX_TXS_COMMITTED; /* nothing was done: no round trip at all */
        return QX_OK;
    }
    /* savepoints and a few statements need a block, and so does a wake-up (it follows the
     * COMMIT); otherwise a transaction that sends everything now needs neither BEGIN nor COMMIT */
    implicit = tx->sends == 0 && !tx->block && nchannels == 0;
    /* the id and timeline go before the COMMIT (in the implicit transaction: after its last
     * statement, inside it), in the same pipeline, so that a lost COMMIT reply can be resolved;
     * a queued statement that reads them (qx_tx_queue_id) saves this one */
    if (tx->id_at < 0)
        tail[ntail++] = (qx_stmt){ XID_SQL, 0, NULL, NULL };
    tx->pend.commit_at = ntail; /* the COMMIT's index in tail; implicit: the Sync commits */
    if (!implicit)
        tail[ntail++] = (qx_stmt){ COMMIT_SQL, 0, NULL, NULL };
    if (nchannels > 0) {
        const char *sql = notify_sql(tx, nchannels);
        if (sql == NULL) {
            qx_error_set(&e, QX_ERR_NOMEM, "out of memory");
            fail(tx, &e);
            return refused(tx, err);
        }
        tail[ntail++] = (qx_stmt){ sql, nchannels, channels, NULL };
    }
    tx->pend.nchannels = nchannels;
    tx->pend.broken_before = conn_broken(tx);
    tx->keep = 1;
    s = send(tx, OP_COMMIT, implicit, tail, ntail, NULL, &at, &e);
    if (s == QX_PENDING)
        return s;
    /* a send refused before its batch (poisoned, out of memory) read no tail */
    tx->pend.ntail = ntail;
    return commit_end(tx, s, at, &e, wake_failed, err);
}

qx_status qx_xact_status(qx_xact *out, qx_conn *c, const char *xid, const char *timeline,
                         qx_error *err)
{
    qx_result *r = NULL;
    qx_status s;
    char status[16], here[12];

    *out = QX_XACT_UNKNOWN;
    s = qx_conn_exec(c, &r, QX_XACT_STATUS_SQL, 1, &xid, NULL, err);
    if (s != QX_OK)
        return s;
    copy_column(status, sizeof status, r, 0);
    copy_column(here, sizeof here, r, 1);
    qx_result_free(r);
    /* an id means one transaction only on the timeline it was handed out on */
    if (timeline != NULL && timeline[0] != '\0' && strcmp(here, timeline) != 0)
        return QX_OK;
    if (strcmp(status, "committed") == 0)
        *out = QX_XACT_COMMITTED;
    else if (strcmp(status, "aborted") == 0)
        *out = QX_XACT_ABORTED;
    else if (strcmp(status, "in progress") == 0)
        *out = QX_XACT_IN_PROGRESS;
    return QX_OK;
}

const char *qx_xact_name(qx_xact x)
{
    switch (x) {
    case QX_XACT_COMMITTED: return "committed";
    case QX_XACT_ABORTED: return "aborted";
    case QX_XACT_IN_PROGRESS: return "in progress";
    case QX_XACT_UNKNOWN: break;
    }
    return "unknown";
}

static qx_status rollback_end(qx_tx *tx, qx_status s)
{
    tx->state = QX_TXS_ROLLED_BACK;
    return s;
}

qx_status qx_tx_rollback(qx_tx *tx, qx_error *err)
{
    static const qx_stmt rollback = { ROLLBACK_SQL, 0, NULL, NULL };
    qx_status s = QX_OK;
    if (tx->pend.op != OP_NONE)
        return refused(tx, err);
    if (tx->state == QX_TXS_COMMITTED || tx->state == QX_TXS_ROLLED_BACK)
        return QX_OK;
    tx->nq = 0;
    tx->nsp = 0;
    tx->poison_at = -1;
    tx->id_at = -1;
    if (tx->sends > 0 && conn_status(tx) != QX_TX_IDLE) {
        s = send(tx, OP_ROLLBACK, 0, &rollback, 1, NULL, NULL, err);
        if (s == QX_PENDING)
            return s;
    }
    return rollback_end(tx, s);
}

qx_status qx_tx_resume(qx_tx *tx, qx_result **out, int *wake_failed, qx_error *err)
{
    int op = tx->pend.op, failed = -1, at = -1;
    qx_status s;
    qx_error e;

    if (out != NULL)
        *out = NULL;
    if (wake_failed != NULL)
        *wake_failed = 0;
    if (op == OP_NONE)
        return qx_error_set(err, QX_ERR_INVALID, "no call waits for its reply");
    if (!qx_wire_batch_done(tx->w))
        return qx_error_set(err, QX_ERR_INVALID, "the reply has not come yet");
    tx->pend.op = OP_NONE;
    s = qx_wire_batch_end(tx->w, &failed, &e);
    switch (op) {
    case OP_QUERY:
        return send_end(tx, s, failed, &e, out, NULL, err);
    case OP_FLUSH:
        return send_end(tx, s, failed, &e, NULL, NULL, err);
    case OP_ROLLBACK_TO:
        return rollback_to_end(tx, send_end(tx, s, failed, &e, NULL, NULL, NULL), err);
    case OP_COMMIT: {
        int wf = 0;
        s = send_end(tx, s, failed, &e, NULL, &at, NULL);
        s = commit_end(tx, s, at, &e, &wf, err);
        if (wake_failed != NULL)
            *wake_failed = wf;
        return s;
    }
    default:
        return rollback_end(tx, send_end(tx, s, failed, &e, NULL, NULL, err));
    }
}
