/* A JetStream pull consumer: a durable consumer on a stream, fetched in batches on the calling
 * thread, each message acknowledged, negatively acknowledged with a delay, or terminated.
 *
 * Everything here runs on the caller's thread: natsSubscription_Fetch waits on the calling
 * thread and hands the messages back, so no nats.c callback is involved. Each fetched message
 * is an object of its own, freed by its holder whenever it likes, also after later fetches; a
 * message left without a reply is redelivered by the server once its ack wait has passed.
 *
 * A nats.c message points at its subscription without holding it, so a message holds a
 * reference to its consumer, whose memory stays until the last message is freed; closing the
 * consumer ends the subscription at once, and a message of a closed consumer can no longer be
 * answered. A consumer and its messages are used from one thread at a time (no locking). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nats/nats.h>

#include "nats_internal.h"
#include "qx.h"

struct qx_consumer {
    int refs;                /* the consumer's own until qx_consumer_free, one per message */
    qx_nats *nats;           /* one reference, held until free; NULL once closed */
    natsSubscription *sub;   /* NULL once closed */
    jsCtx *js;
    char *stream;
    char *durable;
    int64_t skip_before_ns;  /* deliver = from_time: messages stored before it are acked, not
                              * handed over (see start_time_for_server) */
};

struct qx_consumer_msg {
    qx_consumer *c;          /* one reference */
    natsMsg *m;
    jsMsgMetaData *meta;
    int replied;             /* 1 once a final reply (ack, nak, term) went out */
};

void qx_consumer_options_init(qx_consumer_options *o)
{
    memset(o, 0, sizeof *o);
    o->max_deliver = -1;
    o->ack_wait_ms = 30000;
    o->max_ack_pending = 1000;
    o->create = 1;
}

static void consumer_unref(qx_consumer *c)
{
    if (--c->refs > 0)
        return;
    free(c->stream);
    free(c->durable);
    free(c);
}

static int name_ok(const char *s)
{
    if (s == NULL || s[0] == '\0')
        return 0;
    return strpbrk(s, ". *>\t\r\n") == NULL;
}

/* nats.c (3.4) writes a start time's fraction of a second without its leading zeros (.045 s
 * goes out as ".45"), so the server would start up to 0.9 s late and skip messages. A time whose
 * fraction is under 0.1 s goes out as its whole second instead, which the encoder writes
 * exactly; the consumer then acks, without handing them over, the messages stored between that
 * second and the time asked for (qx_consumer_fetch). */
static int64_t start_time_for_server(int64_t ns)
{
    int64_t frac = ns % 1000000000;
    return frac > 0 && frac < 100000000 ? ns - frac : ns;
}

/* The consumer as the options describe it; the fields qx manages (see qx.h). */
static void config_from(jsConsumerConfig *cc, const qx_consumer_options *o)
{
    jsConsumerConfig_Init(cc);
    cc->Durable = o->durable;
    cc->AckPolicy = js_AckExplicit;
    switch (o->deliver) {
    case QX_DELIVER_NEW:
        cc->DeliverPolicy = js_DeliverNew;
        break;
    case QX_DELIVER_FROM_SEQUENCE:
        cc->DeliverPolicy = js_DeliverByStartSequence;
        cc->OptStartSeq = o->start_sequence;
        break;
    case QX_DELIVER_FROM_TIME:
        cc->DeliverPolicy = js_DeliverByStartTime;
        cc->OptStartTime = start_time_for_server(o->start_time_ns);
        break;
    default:
        cc->DeliverPolicy = js_DeliverAll;
    }
    cc->AckWait = (int64_t)o->ack_wait_ms * 1000000;
    cc->MaxDeliver = o->max_deliver > 0 ? o->max_deliver : -1;
    cc->MaxAckPending = o->max_ack_pending;
    cc->FilterSubject = (o->filter_subject != NULL && o->filter_subject[0] != '\0')
                            ? o->filter_subject : NULL;
}

static int str_differ(const char *a, const char *b)
{
    if (a == NULL || a[0] == '\0')
        return !(b == NULL || b[0] == '\0');
    return b == NULL || strcmp(a, b) != 0;
}

/* Creates the durable consumer, or brings an existing one in line with the options. */
static qx_status declare(jsCtx *js, const qx_consumer_options *o, qx_error *err)
{
    jsConsumerConfig want;
    jsConsumerInfo *ci = NULL;
    jsErrCode jerr = 0;
    natsStatus s;
    qx_status st = QX_OK;

    config_from(&want, o);
    s = js_GetConsumerInfo(&ci, js, o->stream, o->durable, NULL, &jerr);
    if (s == NATS_NOT_FOUND && jerr == JSConsumerNotFoundErr) {
        jsConsumerInfo_Destroy(ci);
        ci = NULL;
        s = js_AddConsumer(&ci, js, o->stream, &want, NULL, &jerr);
        if (s != NATS_OK)
            st = qx_nats_error(err, s, jerr, "creating the JetStream consumer");
    } else if (s != NATS_OK) {
        st = qx_nats_error(err, s, jerr, "looking up the JetStream consumer");
    } else {
        const jsConsumerConfig *have = ci->Config;
        if (have == NULL || have->AckWait != want.AckWait || have->MaxDeliver != want.MaxDeliver ||
            have->MaxAckPending != want.MaxAckPending ||
            str_differ(have->FilterSubject, want.FilterSubject) ||
            have->AckPolicy != js_AckExplicit || (have->DeliverSubject != NULL &&
                                                  have->DeliverSubject[0] != '\0')) {
            /* where a durable starts cannot change once it exists (the server refuses): it
             * keeps its own, and its position */
            want.DeliverPolicy = have != NULL ? have->DeliverPolicy : want.DeliverPolicy;
            want.OptStartSeq = have != NULL ? have->OptStartSeq : want.OptStartSeq;
            want.OptStartTime = have != NULL ? have->OptStartTime : want.OptStartTime;
            jsConsumerInfo_Destroy(ci);
            ci = NULL;
            s = js_UpdateConsumer(&ci, js, o->stream, &want, NULL, &jerr);
            if (s != NATS_OK)
                st = qx_nats_error(err, s, jerr, "updating the JetStream consumer to the options given");
        }
    }
    jsConsumerInfo_Destroy(ci);
    return st;
}

qx_status qx_consumer_new(qx_consumer **out, qx_nats *nats, const qx_consumer_options *o,
                          qx_error *err)
{
    qx_consumer *c = NULL;
    jsCtx *js = NULL;
    jsSubOptions so;
    jsErrCode jerr = 0;
    natsStatus s;
    qx_status st;

    *out = NULL;
    if (nats == NULL || o == NULL)
        return qx_error_set(err, QX_ERR_INVALID, "consumer: a NATS connection and options are required");
    if (!name_ok(o->stream))
        return qx_error_set(err, QX_ERR_INVALID,
                            "consumer: stream must be a name without '.', ' ', '*' or '>'");
    if (!name_ok(o->durable))
        return qx_error_set(err, QX_ERR_INVALID,
                            "consumer: durable must be a name without '.', ' ', '*' or '>'");
    if (o->ack_wait_ms <= 0)
        return qx_error_set(err, QX_ERR_INVALID, "consumer: ack_wait_ms must be > 0");
    if (o->max_ack_pending <= 0)
        return qx_error_set(err, QX_ERR_INVALID, "consumer: max_ack_pending must be > 0");
    js = qx_nats_js(nats);

    if (o->create) {
        st = declare(js, o, err);
        if (st != QX_OK)
            return st;
    }

    c = calloc(1, sizeof *c);
    if (c == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "consumer: out of memory");
    c->refs = 1;
    c->nats = qx_nats_retain(nats);
    c->js = js;
    c->stream = strdup(o->stream);
    c->durable = strdup(o->durable);
    c->skip_before_ns = o->deliver == QX_DELIVER_FROM_TIME ? o->start_time_ns : 0;
    if (c->stream == NULL || c->durable == NULL) {
        qx_consumer_free(c);
        return qx_error_set(err, QX_ERR_NOMEM, "consumer: out of memory");
    }

    /* Bound to the durable by name: the consumer's configuration is whatever declare() or the
     * deployment made it, and nats.c does not compare it with ours. */
    jsSubOptions_Init(&so);
    so.Stream = c->stream;
    so.Consumer = c->durable;
    s = js_PullSubscribe(&c->sub, js, o->filter_subject != NULL && o->filter_subject[0] != '\0'
                                          ? o->filter_subject : NULL,
                         c->durable, NULL, &so, &jerr);
    if (s != NATS_OK) {
        st = qx_nats_error(err, s, jerr, "binding to the JetStream consumer");
        c->sub = NULL;
        qx_consumer_free(c);
        return st;
    }
    *out = c;
    return QX_OK;
}

void qx_consumer_free(qx_consumer *c)
{
    if (c == NULL)
        return;
    if (c->sub != NULL) {
        /* the durable consumer stays on the server; only this client's interest goes */
        qx_nats_drop_subscription(c->nats, c->sub);
        c->sub = NULL;
    }
    qx_nats_close(c->nats);
    c->nats = NULL;
    c->js = NULL;
    consumer_unref(c);
}

void qx_consumer_msg_free(qx_consumer_msg *m)
{
    if (m == NULL)
        return;
    jsMsgMetaData_Destroy(m->meta);
    natsMsg_Destroy(m->m);
    consumer_unref(m->c);
    free(m);
}

/* Takes the nats.c message over (on success *nm is NULL). */
static qx_status msg_new(qx_consumer_msg **out, qx_consumer *c, natsMsg **nm, qx_error *err)
{
    qx_consumer_msg *m = calloc(1, sizeof *m);
    natsStatus s;
    *out = NULL;
    if (m == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "fetch: out of memory");
    s = natsMsg_GetMetaData(&m->meta, *nm);
    if (s != NATS_OK) {
        free(m);
        return qx_nats_error(err, s, 0, "fetch: reading message metadata");
    }
    m->m = *nm;
    *nm = NULL;
    m->c = c;
    c->refs++;
    *out = m;
    return QX_OK;
}

static void sleep_until(double deadline)
{
    double left = deadline - qx_clock();
    struct timespec ts;
    if (left <= 0)
        return;
    ts.tv_sec = (time_t)left;
    ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0)
        ; /* interrupted by a signal: sleep the rest */
}

qx_status qx_consumer_fetch(qx_consumer *c, qx_consumer_msg ***msgs, int *count, int batch,
                            int timeout_ms, qx_error *err)
{
    natsMsgList list = { NULL, 0 };
    qx_consumer_msg **out = NULL;
    natsStatus s;
    jsErrCode jerr = 0;
    double started;
    qx_status st = QX_OK;
    int i, n, left;

    *msgs = NULL;
    *count = 0;
    if (c == NULL || c->sub == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "consumer is closed");
    if (batch < 1)
        return qx_error_set(err, QX_ERR_INVALID, "fetch: batch must be >= 1");
    if (timeout_ms < 1)
        return qx_error_set(err, QX_ERR_INVALID, "fetch: timeout_ms must be >= 1");
    if (qx_nats_get_state(c->nats) == QX_NATS_CLOSED)
        return qx_error_set(err, QX_ERR_CLOSED, "fetch: the NATS connection is closed");

    started = qx_clock();
    left = timeout_ms;
    for (;;) {
        s = natsSubscription_Fetch(&list, c->sub, batch, left, &jerr);
        if (s != NATS_TIMEOUT)
            break;
        natsMsgList_Destroy(&list);
        /* The pull requests of a subscription share one reply subject, so the expiry notice
         * (408) of an earlier, empty fetch can end this one early: ask again for the rest. */
        left = timeout_ms - (int)((qx_clock() - started) * 1000.0);
        if (left < 5)
            return QX_OK; /* nothing arrived in time */
    }
    if (s != NATS_OK) {
        natsMsgList_Destroy(&list);
        st = qx_nats_error(err, s, jerr, "fetching from the JetStream consumer");
        if (qx_nats_get_state(c->nats) == QX_NATS_CLOSED)
            return qx_error_set(err, QX_ERR_CLOSED, "fetch: the NATS connection is closed");
        /* a failure that may pass (server shutting down, consumer being recreated): report it
         * only once the timeout is up, so that a loop around fetch does not spin */
        sleep_until(started + timeout_ms / 1000.0);
        return st;
    }

    n = list.Count;
    if (n > 0) {
        out = calloc((size_t)n, sizeof *out);
        if (out == NULL)
            st = qx_error_set(err, QX_ERR_NOMEM, "fetch: out of memory");
    }
    for (i = 0; st == QX_OK && i < n; i++)
        st = msg_new(&out[i], c, &list.Msgs[i], err);
    natsMsgList_Destroy(&list); /* what was not taken over: unanswered, redelivered later */
    if (st != QX_OK) {
        for (i = 0; out != NULL && i < n; i++)
            qx_consumer_msg_free(out[i]);
        free(out);
        return st;
    }
    if (c->skip_before_ns > 0) {
        /* stored before the time the consumer starts at: acked here, never handed over (an ack
         * that fails leaves the message to come back, and be skipped, again) */
        int kept = 0;
        for (i = 0; i < n; i++) {
            if (out[i]->meta->Timestamp < c->skip_before_ns) {
                natsMsg_Ack(out[i]->m, NULL);
                out[i]->replied = 1;
                qx_consumer_msg_free(out[i]);
            } else {
                out[kept++] = out[i];
            }
        }
        n = kept;
        if (n == 0) {
            free(out);
            out = NULL;
        }
    }
    *msgs = out;
    *count = n;
    return QX_OK;
}

void qx_consumer_msg_info_get(const qx_consumer_msg *msg, qx_consumer_msg_info *out)
{
    natsMsg *m = msg->m;
    const jsMsgMetaData *md = msg->meta;
    memset(out, 0, sizeof *out);
    out->subject = natsMsg_GetSubject(m);
    out->data = natsMsg_GetData(m);
    out->data_len = natsMsg_GetDataLength(m);
    if (out->data == NULL)
        out->data = "";
    out->stream = md->Stream;
    out->consumer = md->Consumer;
    out->stream_seq = md->Sequence.Stream;
    out->consumer_seq = md->Sequence.Consumer;
    out->delivered = md->NumDelivered;
    out->pending = md->NumPending;
    out->timestamp_ns = md->Timestamp;
    qx_iso8601_from_ns(out->published_at, md->Timestamp);
    out->replied = msg->replied;
}

int qx_consumer_msg_replied(const qx_consumer_msg *m)
{
    return m->replied;
}

qx_status qx_consumer_msg_headers(qx_consumer_msg *m, const char ***keys, const char ***values,
                                  int *count, qx_error *err)
{
    const char **k = NULL, **v = NULL;
    int n = 0, j;
    natsStatus s;

    *keys = NULL;
    *values = NULL;
    *count = 0;
    s = natsMsgHeader_Keys(m->m, &k, &n);
    if (s == NATS_NOT_FOUND)
        return QX_OK; /* no headers */
    if (s != NATS_OK)
        return qx_nats_error(err, s, 0, "reading message headers");
    v = calloc((size_t)n, sizeof *v);
    if (v == NULL) {
        free((void *)k);
        return qx_error_set(err, QX_ERR_NOMEM, "headers: out of memory");
    }
    for (j = 0; j < n; j++) {
        if (natsMsgHeader_Get(m->m, k[j], &v[j]) != NATS_OK || v[j] == NULL)
            v[j] = ""; /* a key without a value */
    }
    *keys = k;
    *values = v;
    *count = n;
    return QX_OK;
}

qx_status qx_consumer_msg_reply(qx_consumer_msg *msg, qx_reply kind, int64_t delay_ms,
                                qx_error *err)
{
    natsMsg *m = msg->m;
    natsStatus s;
    jsErrCode jerr = 0;
    const char *what;
    if (msg->c->sub == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "consumer is closed");
    if (msg->replied)
        return qx_error_set(err, QX_ERR_INVALID,
                            "the message (stream sequence %" PRIu64 ") was already answered",
                            msg->meta->Sequence.Stream);
    switch (kind) {
    case QX_REPLY_ACK:
        what = "ack";
        s = natsMsg_Ack(m, NULL);
        break;
    case QX_REPLY_ACK_SYNC:
        what = "ack";
        s = natsMsg_AckSync(m, NULL, &jerr);
        break;
    case QX_REPLY_NAK:
        what = "nak";
        s = delay_ms > 0 ? natsMsg_NakWithDelay(m, delay_ms, NULL) : natsMsg_Nak(m, NULL);
        break;
    case QX_REPLY_TERM:
        what = "term";
        s = natsMsg_Term(m, NULL);
        break;
    case QX_REPLY_IN_PROGRESS:
        what = "in progress";
        s = natsMsg_InProgress(m, NULL);
        break;
    default:
        return qx_error_set(err, QX_ERR_INVALID, "reply: unknown kind %d", (int)kind);
    }
    if (s != NATS_OK)
        return qx_nats_error(err, s, jerr, what);
    if (kind != QX_REPLY_IN_PROGRESS)
        msg->replied = 1;
    return QX_OK;
}

qx_status qx_consumer_info_get(qx_consumer *c, qx_consumer_info *out, qx_error *err)
{
    jsConsumerInfo *ci = NULL;
    jsErrCode jerr = 0;
    natsStatus s;

    memset(out, 0, sizeof *out);
    if (c == NULL || c->sub == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "consumer is closed");
    s = js_GetConsumerInfo(&ci, c->js, c->stream, c->durable, NULL, &jerr);
    if (s != NATS_OK)
        return qx_nats_error(err, s, jerr, "consumer info");
    out->num_pending = ci->NumPending;
    out->num_ack_pending = ci->NumAckPending;
    out->num_redelivered = ci->NumRedelivered;
    out->num_waiting = ci->NumWaiting;
    out->delivered_stream_seq = ci->Delivered.Stream;
    out->ack_floor_stream_seq = ci->AckFloor.Stream;
    if (ci->Config != NULL) {
        out->max_deliver = ci->Config->MaxDeliver;
        out->ack_wait_ms = ci->Config->AckWait / 1000000;
        out->max_ack_pending = ci->Config->MaxAckPending;
    }
    jsConsumerInfo_Destroy(ci);
    return QX_OK;
}

const char *qx_consumer_stream(const qx_consumer *c)
{
    return c != NULL ? c->stream : NULL;
}

const char *qx_consumer_durable(const qx_consumer *c)
{
    return c != NULL ? c->durable : NULL;
}
