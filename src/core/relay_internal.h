/* What the relay's files share: its state and the stages of a batch (relay.c runs them;
 * relay_claim.c, relay_publish.c and relay_mark.c are the stages). Not part of the core's API. */
#ifndef QX_RELAY_INTERNAL_H
#define QX_RELAY_INTERNAL_H

#include <pthread.h>

#include "internal.h"
#include "nats_internal.h"

/* The columns of the claim's result (relay_claim.c). */
enum { COL_ID, COL_NAME, COL_VERSION, COL_BODY, COL_KIND, COL_CORRELATION, COL_TENANT, COL_KEY,
       COL_ATTEMPTS, COL_SEQ, COL_CTID, COL_TRACEPARENT, COL_TRACESTATE };

/* ROW_FAILED: the message's own failure, counted toward max_attempts; ROW_RETRY: the
 * transport's (no connection, a timeout, no responders, a stream without a leader): retried
 * after the backoff, attempts unchanged, never dead-lettered for it */
enum row_state { ROW_WAITING, ROW_INFLIGHT, ROW_ACKED, ROW_FAILED, ROW_RETRY, ROW_DEAD, ROW_HELD };

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
    int counts;      /* a failure that belongs to the message (see relay_failure_counts) */
    char error[ROW_ERROR_MAX];
} completion;

/* The statements that mark a batch's outcome and commit it, with what they point into; they may
 * be sent from another thread while the relay goes on with the next batch. */
typedef struct marking {
    qx_buf acked, ids, errors, dead, counts; /* array literals */
    char max_attempts[16], base[16], maxd[16], lock_pid[16];
    const char *pub_params[1], *fail_params[7], *fence_params[2];
    qx_stmt stmts[4];
    qx_result *results[4];
    int nstmts, failed_idx;
    int fence_idx;      /* the statement that checks the shard lock, or -1 */
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
    int late_acks;      /* messages were taken back after an ack timeout: their acks may come
                         * late, so the contexts are kept until their connections close */
    qx_conn *conns[2];  /* conns[0] holds the shard lock and LISTENs; both run batches */
    int leader;
    /* Fencing (docs/relay.md, "Fencing"): the lock session's backend pid, which the other
     * connection's claims and marks check in pg_locks; its socket, watched while publishing; and
     * whether the lock was found gone (set and read on the relay's own thread only) */
    char lock_pid[16];
    int lock_fd;
    int lock_lost;
    int lock_lost_unreported;
    batch slot[2];      /* the batch being published and the one being marked */
    qx_strmap keys;     /* per batch: partition key -> its last row so far */
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
    qx_ptrmap unacked;  /* message in flight -> its row */

    volatile int stop;
    int wake[2];        /* a byte here cuts a wait short */
    qx_relay_stats stats;
};

/* relay.c */
QX_INTERNAL double relay_wall_now(void);
QX_INTERNAL void relay_note_error(qx_relay *r, const qx_error *err);

/* relay_claim.c: the database side of leadership and claiming */
QX_INTERNAL void relay_set_stmt(qx_stmt *st, const char *sql, int n, const char *const *values);
/* Closes connection k; closing conns[0] ends the shard lock. */
QX_INTERNAL void relay_drop_connection(qx_relay *r, int k);
/* Takes the shard's advisory lock when this relay does not hold it (first closing the lock
 * session when the lock was found gone). */
QX_INTERNAL qx_status relay_ensure_leader(qx_relay *r, qx_error *err);
/* The statement that fails a transaction of conns[1] unless the lock session still holds the
 * shard lock; its parameters are r->lock_pid and r->lock_name. */
QX_INTERNAL extern const char relay_fence_sql[];
/* 1 when err is the fence's failure. */
QX_INTERNAL int relay_fence_failed(const qx_error *err);
/* Notes that the shard lock is gone and sets err to say so. */
QX_INTERNAL qx_status relay_lock_gone(qx_relay *r, qx_error *err);
/* 1 when the lock session's server closed its end (terminated, restarted) or the lock was
 * found gone: publishing must stop. A poll of its socket; no libpq call, so safe while another
 * thread uses that connection. */
QX_INTERNAL int relay_lock_session_gone(qx_relay *r);
/* Rolls the open transaction back (its rows stay pending) and frees the batch. */
QX_INTERNAL void relay_abort_batch(qx_relay *r, batch *b);
/* BEGIN and claim, in one round trip, on the batch's connection. seqs: an array literal of the
 * rows being marked on the other connection, or NULL. */
QX_INTERNAL qx_status relay_claim(qx_relay *r, batch *b, const char *seqs, qx_error *err);

/* relay_publish.c */
/* The JetStream contexts' ack handler (runs on a nats.c thread). */
QX_INTERNAL void relay_on_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae,
                              void *closure);
/* Starts publishing a claimed batch; relay_publish_wait collects the acks. */
QX_INTERNAL void relay_publish_start(qx_relay *r, batch *b);
QX_INTERNAL void relay_publish_wait(qx_relay *r, batch *b);

/* relay_mark.c */
QX_INTERNAL void relay_marking_free(marking *mk);
QX_INTERNAL qx_status relay_mark_prepare(qx_relay *r, batch *b, qx_error *err);
QX_INTERNAL void relay_mark_send(qx_conn *conn, marking *mk);
QX_INTERNAL qx_status relay_mark_complete(qx_relay *r, batch *b, qx_error *err);
/* Marks the outcome of a published batch and commits it, in one round trip. */
QX_INTERNAL qx_status relay_finish(qx_relay *r, batch *b, qx_error *err);
QX_INTERNAL int relay_acked_seqs(const batch *b, qx_buf *seqs);

#endif
