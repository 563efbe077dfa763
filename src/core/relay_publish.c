/* The relay's publish stage: a claimed batch goes out asynchronously within the window of
 * max_in_flight unacked messages, each key's next row as soon as its previous one is acked.
 * The ack handler runs on nats.c's threads and only records the outcome under r->mu. */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "relay_internal.h"

/* Whether a failed publish is the message's own fault, and counts toward max_attempts: it is
 * too large for the server or the stream, or the server refused it as malformed. Everything
 * else (no connection, a timeout, no responders, a stream without a leader or offline, storage
 * or limits of the stream) is the transport's or the operator's: an outage of any length must
 * not dead-letter an event that would have gone out once it was over. */
static int relay_failure_counts(natsStatus s, jsErrCode code)
{
    return s == NATS_MAX_PAYLOAD || code == JSStreamMessageExceedsMaximumErr ||
           code == JSBadRequestErr;
}

/* ---- the ack handler (nats.c thread) ----------------------------------------------------- */

void relay_on_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    qx_relay *r = closure;
    int idx;
    (void)js;
    pthread_mutex_lock(&r->mu);
    idx = qx_ptrmap_take(&r->unacked, msg);
    if (idx >= 0 && r->ndone < r->o.batch_size) {
        completion *c = &r->done[r->ndone++];
        c->idx = idx;
        c->ok = pa != NULL;
        c->duplicate = pa != NULL && pa->Duplicate;
        c->counts = pae != NULL && relay_failure_counts(pae->Err, pae->ErrCode);
        c->error[0] = '\0';
        if (c->duplicate && pa->Sequence == 0) {
            /* nats-server before 2.11 could stage an id whose message a stream leader change
             * then dropped: its retries are "duplicates" of nothing. A true duplicate's ack
             * names the stored message's sequence; this one is not published. */
            c->ok = c->duplicate = 0;
            snprintf(c->error, sizeof c->error,
                     "nats: acked as a duplicate of no stored message (sequence 0): not published");
        } else if (pa == NULL && pae != NULL) {
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

/* ---- sending ----------------------------------------------------------------------------- */

/* Links each row to the next row of its key: only the first row of a key is ready, and each ack
 * releases the next one. */
static void link_keys(qx_relay *r, batch *b)
{
    int i;
    qx_strmap_clear(&r->keys);
    b->nready = 0;
    for (i = 0; i < b->n; i++) {
        row *w = &b->rows[i];
        int prev = -1;
        w->next = -1;
        if (!qx_result_isnull(b->res, i, COL_KEY))
            prev = qx_strmap_swap(&r->keys, qx_result_value(b->res, i, COL_KEY), i);
        if (prev >= 0)
            b->rows[prev].next = i; /* prev was the last row of this key so far */
        else
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
            row_fail(w, ROW_RETRY, "nomem: out of memory");
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

/* The data subject whose key sealed the body's personal fields (values "qx:sealed:1:<uuid>:...",
 * docs/erasure.md) as the qx.key_id header: a reader that cannot reach the key table learns
 * which key the message needs. An event has one subject; a body without one gets no header. */
static natsStatus set_key_header(natsMsg *m, const char *body, int len)
{
    static const char mark[] = "\"qx:sealed:1:";
    const char *p = len > 0 ? memmem(body, (size_t)len, mark, sizeof mark - 1) : NULL;
    char id[37];
    if (p == NULL)
        return NATS_OK;
    p += sizeof mark - 1;
    if (body + len - p < 37 || p[36] != ':')
        return NATS_OK;
    memcpy(id, p, 36);
    id[36] = '\0';
    if (!qx_uuid_valid(id, 36))
        return NATS_OK;
    return natsMsgHeader_Set(m, "qx.key_id", id);
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
    if (s == NATS_OK) /* the key the relay orders by: a consumer committing in batches keeps it */
        s = set_header(m, res, i, COL_KEY, "qx.partition_key");
    /* W3C Trace Context of the unit of work that wrote the row (NULL, and no header, without) */
    if (s == NATS_OK)
        s = set_header(m, res, i, COL_TRACEPARENT, "traceparent");
    if (s == NATS_OK)
        s = set_header(m, res, i, COL_TRACESTATE, "tracestate");
    if (s == NATS_OK) /* the subject whose key opens the body's sealed fields, if any */
        s = set_key_header(m, qx_result_value(res, i, COL_BODY),
                           qx_result_length(res, i, COL_BODY));
    if (s != NATS_OK) {
        natsMsg_Destroy(m);
        /* a header value nats.c refuses belongs to the row; memory does not */
        row_fail(w, s == NATS_NO_MEMORY ? ROW_RETRY : ROW_FAILED, "nats: %s",
                 natsStatus_GetText(s));
        return 0;
    }
    jsPubOptions_Init(&po);
    po.MsgId = qx_result_value(res, i, COL_ID);

    w->state = ROW_INFLIGHT;
    pthread_mutex_lock(&r->mu);
    qx_ptrmap_put(&r->unacked, m, i); /* before publishing: the ack may come back before the call returns */
    pthread_mutex_unlock(&r->mu);
    s = js_PublishMsgAsync(b->js, &m, &po);
    if (s != NATS_OK) {
        natsStatus last = NATS_OK;
        const char *detail = nats_GetLastError(&last);
        pthread_mutex_lock(&r->mu);
        qx_ptrmap_take(&r->unacked, m);
        pthread_mutex_unlock(&r->mu);
        natsMsg_Destroy(m);
        if (s == NATS_MAX_PAYLOAD)
            row_fail(w, ROW_DEAD, "invalid: the message is larger than the server's max payload");
        else
            row_fail(w, relay_failure_counts(s, 0) ? ROW_FAILED : ROW_RETRY, "nats: %s",
                     last == s && detail != NULL ? detail : natsStatus_GetText(s));
        return 0;
    }
    return 1;
}

/* Sends what is ready, up to the window. */
static void send_ready(qx_relay *r, batch *b)
{
    /* nothing more once the lock session is gone: a standby may be taking over; what is not
     * sent stays pending (held) and the batch's marks are fenced off */
    if (b->head < b->nready && relay_lock_session_gone(r))
        return;
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
    if (r->bulk == NULL && relay_wall_now() >= r->bulk_retry_at) {
        qx_error e;
        jsOptions jo;
        if (qx_nats_open_gathering(r->nats, &r->bulk, &e) == QX_OK) {
            jsOptions_Init(&jo);
            jo.PublishAsync.MaxPending = (int64_t)r->o.max_in_flight * 2 + 16;
            jo.PublishAsync.AckHandler = relay_on_ack;
            jo.PublishAsync.AckHandlerClosure = r;
            if (natsConnection_JetStream(&r->bulk_js, qx_nats_conn(r->bulk), &jo) != NATS_OK) {
                r->bulk_js = NULL;
                qx_nats_close(r->bulk);
                r->bulk = NULL;
            }
        }
        if (r->bulk == NULL)
            r->bulk_retry_at = relay_wall_now() + BULK_RETRY_SECONDS;
    }
    if (r->bulk != NULL && qx_nats_get_state(r->bulk) == QX_NATS_CONNECTED)
        return r->bulk_js;
    return r->js;
}

void relay_publish_start(qx_relay *r, batch *b)
{
    b->head = b->inflight = b->settled = 0;
    link_keys(r, b);
    b->js = choose_context(r, b);
    pthread_mutex_lock(&r->mu);
    r->ndone = 0;
    r->want = 1;
    r->urgent = 0;
    r->pub_rows = b->rows;
    qx_ptrmap_clear(&r->unacked);
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
        row_fail(w, c->counts ? ROW_FAILED : ROW_RETRY, "%s", c->error);
        b->settled += hold_successors(b, c->idx);
    }
}

/* Collects the acks of a batch, sending each key's next row as its previous one is acked,
 * until every row is settled, or until no ack came for ack_timeout_ms: the unacked rows then
 * failed and the messages are taken back from the context. */
void relay_publish_wait(qx_relay *r, batch *b)
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
        r->late_acks = 1;
        if (js_PublishAsyncGetPendingList(&pending, b->js) == NATS_OK)
            natsMsgList_Destroy(&pending);
        pthread_mutex_lock(&r->mu);
        for (i = 0; i < r->ndone; i++) /* acks that slipped in meanwhile still count */
            apply_completion(b, &r->done[i]);
        r->ndone = 0;
        qx_ptrmap_clear(&r->unacked);
        pthread_mutex_unlock(&r->mu);
        for (i = 0; i < b->n; i++) {
            if (b->rows[i].state == ROW_INFLIGHT) {
                row_fail(&b->rows[i], ROW_RETRY, "timeout: no ack from JetStream within %d ms",
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
