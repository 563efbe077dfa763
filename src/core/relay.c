/*
 * The outbox relay: qx_outbox_events -> JetStream. This file runs the batches (claim, publish,
 * mark and COMMIT, one transaction each, the mark of one overlapping the claim of the next); the
 * stages are relay_claim.c, relay_publish.c and relay_mark.c, their shared state relay_internal.h.
 * Acks arrive on nats.c's threads and are only recorded there, under a mutex; everything else
 * runs on the relay's threads. Why this keeps order and loses nothing: docs/relay.md.
 */
#define _GNU_SOURCE /* pipe2 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "relay_internal.h"

double relay_wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void relay_note_error(qx_relay *r, const qx_error *err)
{
    r->stats.errors++;
    snprintf(r->stats.last_error, sizeof r->stats.last_error, "%s: %.990s",
             qx_status_name(err->status), err->message);
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
    r->lock_fd = -1;
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
    ok = ok && qx_strmap_init(&r->keys, n) && qx_ptrmap_init(&r->unacked, n);
    r->done = calloc((size_t)n, sizeof *r->done);
    r->local = calloc((size_t)n, sizeof *r->local);
    r->subject_cap = 512;
    r->subject = malloc(r->subject_cap);
    if (!ok || r->done == NULL || r->local == NULL || r->subject == NULL) {
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
    jo.PublishAsync.AckHandler = relay_on_ack;
    jo.PublishAsync.AckHandlerClosure = r;
    s = natsConnection_JetStream(&r->js, qx_nats_conn(r->nats), &jo);
    if (s != NATS_OK) {
        q = qx_nats_error(err, s, 0, "relay: JetStream context");
        qx_relay_free(r);
        return q;
    }
    r->stats.started_at = relay_wall_now();
    *out = r;
    return QX_OK;
}

void qx_relay_free(qx_relay *r)
{
    int k;
    if (r == NULL)
        return;
    /* nothing is pending in the contexts between batches, so no ack handler runs after this */
    if (r->bulk_js != NULL)
        qx_nats_drop_context(r->bulk, r->bulk_js, r->late_acks);
    if (r->js != NULL)
        qx_nats_drop_context(r->nats, r->js, r->late_acks);
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
    qx_strmap_free(&r->keys);
    free(r->done);
    free(r->local);
    qx_ptrmap_free(&r->unacked);
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
    s->leader = r->leader && !r->lock_lost;
    s->nats_state = qx_nats_get_state(r->nats);
    s->nats_reconnects = qx_nats_reconnects(r->nats);
}

static void account(qx_relay *r, const qx_relay_result *o)
{
    r->stats.batches++;
    r->stats.claimed += o->claimed;
    r->stats.published += o->published;
    r->stats.duplicates += o->duplicates;
    r->stats.failed += o->failed;
    r->stats.retried += o->retried;
    r->stats.dead_lettered += o->dead_lettered;
    r->stats.held += o->held;
    r->stats.last_batch_at = relay_wall_now();
    r->stats.last_error[0] = '\0';
}

/* What the relay's state is, for a report: whether its lock session is connected, and whether
 * the lock was found gone since the last report. */
static void report_state(qx_relay *r, qx_relay_result *o)
{
    o->leader = r->leader && !r->lock_lost;
    o->database = r->conns[0] != NULL && !qx_conn_is_broken(r->conns[0]);
    o->lock_lost = r->lock_lost_unreported;
    r->lock_lost_unreported = 0;
}

/* Leadership and NATS before a claim: QX_OK with r->leader = 0 when another relay leads. */
static qx_status ready_to_claim(qx_relay *r, qx_error *err)
{
    qx_status q = relay_ensure_leader(r, err);
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
    if (q == QX_OK && !r->leader) {
        report_state(r, out);
        return QX_OK;
    }
    if (q == QX_OK)
        q = relay_claim(r, b, NULL, err);
    if (q == QX_OK) {
        if (b->n > 0) {
            relay_publish_start(r, b);
            relay_publish_wait(r, b);
        }
        q = relay_finish(r, b, err);
        *out = b->out;
    }
    report_state(r, out);
    if (q != QX_OK) {
        relay_note_error(r, err);
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
            relay_drop_connection(r, 0);
    }
    return 0;
}

typedef struct mark_job {
    qx_conn *conn;
    marking *mk;
} mark_job;

static void *mark_thread(void *p)
{
    mark_job *j = p;
    relay_mark_send(j->conn, j->mk);
    return NULL;
}

/* Accounts a finished batch and tells fn; returns 1 when fn asks to stop. */
static int settle(qx_relay *r, batch *b, qx_status q, const qx_error *e, qx_relay_batch_fn fn,
                  void *ud)
{
    if (q == QX_OK)
        account(r, &b->out);
    else
        relay_note_error(r, e);
    report_state(r, &b->out);
    return fn != NULL && fn(ud, &b->out, q == QX_OK ? NULL : e) != 0;
}

/* May the next batch be claimed while this one is marked? Only a leader with both connections
 * of a batch that found rows, with NATS up, when no one asked to stop. */
static int may_overlap(qx_relay *r, const batch *cur, int stop, int handle_signals)
{
    return cur->n > 0 && !stop && !stopping(r, handle_signals) && r->leader && !r->lock_lost &&
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
        qx_buf seqs;
        mark_job job;
        pthread_t th;
        qx_status q, next_q;
        int wait_ms, threaded;

        qx_buf_init(&seqs, NULL, 0);
        if (cur == NULL) {
            if (stopping(r, handle_signals) || stop_asked)
                break;
            memset(&idle, 0, sizeof idle);
            q = ready_to_claim(r, &e);
            if (q == QX_OK && r->leader) {
                cur = &r->slot[0];
                chained = started = 0;
                q = relay_claim(r, cur, NULL, &e);
                if (q != QX_OK)
                    cur = NULL;
            }
            if (cur == NULL) {
                report_state(r, &idle);
                if (q != QX_OK)
                    relay_note_error(r, &e);
                if (fn != NULL && fn(ud, &idle, q == QX_OK ? NULL : &e))
                    stop_asked = 1;
                if (!stopping(r, handle_signals) && !stop_asked)
                    wait_for_work(r, r->o.lock_retry_ms);
                continue;
            }
        }

        if (cur->n > 0) {
            if (!started)
                relay_publish_start(r, cur);
            relay_publish_wait(r, cur);
        }
        started = 0;

        if (!may_overlap(r, cur, stop_asked, handle_signals)) {
            q = relay_finish(r, cur, &e);
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
        q = relay_mark_prepare(r, cur, &e);
        if (q != QX_OK || !relay_acked_seqs(cur, &seqs)) {
            qx_buf_free(&seqs);
            if (q == QX_OK)
                relay_marking_free(&cur->mk);
            q = relay_finish(r, cur, &e); /* again, in turn: the plain way */
            if (settle(r, cur, q, &e, fn, ud))
                stop_asked = 1;
            cur = NULL;
            continue;
        }
        job.conn = r->conns[cur->ci];
        job.mk = &cur->mk;
        threaded = pthread_create(&th, NULL, mark_thread, &job) == 0;
        if (!threaded)
            relay_mark_send(job.conn, job.mk);
        next_q = relay_claim(r, next, seqs.p, &ne);
        qx_buf_free(&seqs);
        if (next_q == QX_OK && next->n > 0 && !stopping(r, handle_signals)) {
            relay_publish_start(r, next);
            started = 1;
        }
        if (threaded)
            pthread_join(th, NULL);
        q = relay_mark_complete(r, cur, &e);
        if (settle(r, cur, q, &e, fn, ud))
            stop_asked = 1;
        if (next_q == QX_OK && r->lock_lost) {
            /* the mark found the lock gone: this relay leads no more; give the next batch back
             * (send_ready has stopped its publishing) */
            if (started)
                relay_publish_wait(r, next);
            relay_abort_batch(r, next);
            started = 0;
            cur = NULL;
            continue;
        }
        if (next_q != QX_OK) {
            relay_note_error(r, &ne); /* relay_claim() has given the rows back */
            cur = NULL;
            if (!stop_asked && !stopping(r, handle_signals))
                wait_for_work(r, r->o.lock_retry_ms);
            continue;
        }
        if (stop_asked || stopping(r, handle_signals)) {
            if (started) {
                /* its messages are out: see them acked and marked, then stop */
                relay_publish_wait(r, next);
                q = relay_finish(r, next, &e);
                if (q == QX_OK)
                    account(r, &next->out);
                else
                    relay_note_error(r, &e);
            } else {
                relay_abort_batch(r, next); /* nothing of it was sent: give the rows back */
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
