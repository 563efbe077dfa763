/*
 * One connection to NATS with JetStream (nats.c).
 *
 * Publishers, relays and consumers of a process share it; it is reference counted so that a
 * relay or a consumer that retained it keeps it open after its opener closed it. nats.c runs
 * its own threads (reading, flushing, reconnecting, callbacks); nothing here calls back into
 * the caller from them.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nats_internal.h"

#define MAX_SERVERS 32

/* A subscription or JetStream context dropped while the connection lives, kept until the
 * connection closes (see qx_nats_drop_subscription). */
typedef struct grave {
    struct grave *next;
    natsSubscription *sub;
    jsCtx *js;
} grave;

struct qx_nats {
    natsConnection *nc;
    jsCtx *js;
    int refs; /* changed with atomics: a relay may drop its reference from another thread */
    natsOptions *opts;   /* what it was opened with, for qx_nats_open_gathering */
    int send_asap;
    pthread_mutex_t mu;  /* guards opts and graves */
    grave *graves;
};

/* ---- errors ------------------------------------------------------------------------------ */

qx_status qx_nats_error(qx_error *err, natsStatus s, jsErrCode jerr, const char *what)
{
    natsStatus last = NATS_OK;
    const char *detail = nats_GetLastError(&last);
    const char *text = natsStatus_GetText(s);
    qx_status q;

    switch (s) {
    case NATS_TIMEOUT:
        q = QX_ERR_TIMEOUT;
        break;
    case NATS_NO_SERVER:
    case NATS_CONNECTION_CLOSED:
    case NATS_CONNECTION_DISCONNECTED:
    case NATS_CONNECTION_AUTH_FAILED:
    case NATS_NOT_PERMITTED:
    case NATS_STALE_CONNECTION:
    case NATS_IO_ERROR:
    case NATS_SSL_ERROR:
    case NATS_SYS_ERROR:
    case NATS_ADDRESS_MISSING:
    case NATS_NOT_YET_CONNECTED:
        q = QX_ERR_CONNECTION;
        break;
    case NATS_NOT_FOUND:
        q = QX_ERR_NOT_FOUND;
        break;
    case NATS_INVALID_ARG:
    case NATS_INVALID_SUBJECT:
    case NATS_MAX_PAYLOAD:
        q = QX_ERR_INVALID;
        break;
    case NATS_NO_MEMORY:
        q = QX_ERR_NOMEM;
        break;
    default:
        q = QX_ERR_NATS;
        break;
    }
    if (jerr == JSStreamNotFoundErr)
        q = QX_ERR_NOT_FOUND;
    /* nats.c prefixes the text with its source location: "(conn.c:2088): No server ..." */
    if (detail != NULL && detail[0] == '(') {
        const char *p = strstr(detail, "): ");
        if (p != NULL)
            detail = p + 3;
    }
    /* the last error text often repeats the status text; show it only when it says more */
    if (last == s && detail != NULL && detail[0] != '\0' && strcmp(detail, text) != 0)
        qx_error_set(err, q, "%s: %s", what, detail);
    else if (jerr != 0)
        qx_error_set(err, q, "%s: %s (JetStream error %d)", what, text, (int)jerr);
    else
        qx_error_set(err, q, "%s: %s", what, text);
    return q;
}

/* ---- options ----------------------------------------------------------------------------- */

void qx_nats_options_init(qx_nats_options *o)
{
    memset(o, 0, sizeof *o);
    o->servers = "nats://127.0.0.1:4222";
    o->connect_timeout_ms = 2000;
    o->reconnect_attempts = -1;
    o->reconnect_wait_ms = 2000;
    o->ping_interval_ms = 2000;
    o->max_pings_out = 2;
    o->send_asap = 1;
}

static int empty(const char *s) { return s == NULL || s[0] == '\0'; }

/* Splits "a, b,c" into trimmed urls stored in buf; returns the count or -1. */
static int split_servers(const char *list, char *buf, size_t bufsize, const char **urls, int max)
{
    size_t len = strlen(list);
    int n = 0;
    char *p, *tok;

    if (len + 1 > bufsize)
        return -1;
    memcpy(buf, list, len + 1);
    for (p = buf; (tok = strsep(&p, ",")) != NULL;) {
        char *end;
        while (*tok == ' ' || *tok == '\t')
            tok++;
        end = tok + strlen(tok);
        while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
            *--end = '\0';
        if (*tok == '\0')
            continue;
        if (n == max)
            return -1;
        urls[n++] = tok;
    }
    return n;
}

static qx_status build_options(natsOptions **out, const qx_nats_options *o, char *buf,
                               size_t bufsize, qx_error *err)
{
    const char *urls[MAX_SERVERS];
    natsOptions *opts = NULL;
    natsStatus s;
    int n, i;

    *out = NULL;
    if (empty(o->servers))
        return qx_error_set(err, QX_ERR_INVALID, "no NATS server url given");
    n = split_servers(o->servers, buf, bufsize, urls, MAX_SERVERS);
    if (n <= 0)
        return qx_error_set(err, QX_ERR_INVALID, "servers must list 1 to %d urls", MAX_SERVERS);
    for (i = 0; i < n; i++) {
        if (strstr(urls[i], "://") != NULL && strncmp(urls[i], "nats://", 7) != 0 &&
            strncmp(urls[i], "tls://", 6) != 0)
            return qx_error_set(err, QX_ERR_INVALID,
                                "server url %d: expected nats:// or tls://", i + 1);
    }
    if (o->connect_timeout_ms <= 0)
        return qx_error_set(err, QX_ERR_INVALID, "connect_timeout_ms must be > 0");
    if (o->reconnect_attempts < -1)
        return qx_error_set(err, QX_ERR_INVALID, "reconnect_attempts must be >= -1");
    if (o->reconnect_wait_ms < 0)
        return qx_error_set(err, QX_ERR_INVALID, "reconnect_wait_ms must be >= 0");
    if (o->ping_interval_ms <= 0)
        return qx_error_set(err, QX_ERR_INVALID, "ping_interval_ms must be > 0");
    if (o->max_pings_out <= 0)
        return qx_error_set(err, QX_ERR_INVALID, "max_pings_out must be > 0");
    if (!empty(o->password) && empty(o->user))
        return qx_error_set(err, QX_ERR_INVALID, "a password needs a user");
    if (empty(o->tls_cert) != empty(o->tls_key))
        return qx_error_set(err, QX_ERR_INVALID, "tls_cert and tls_key go together");

    s = natsOptions_Create(&opts);
    if (s == NATS_OK)
        s = natsOptions_SetServers(opts, urls, n);
    if (s == NATS_OK)
        s = natsOptions_SetNoRandomize(opts, true); /* the order given is the order tried */
    if (s == NATS_OK && !empty(o->name))
        s = natsOptions_SetName(opts, o->name);
    if (s == NATS_OK && !empty(o->user))
        s = natsOptions_SetUserInfo(opts, o->user, empty(o->password) ? NULL : o->password);
    if (s == NATS_OK && !empty(o->token))
        s = natsOptions_SetToken(opts, o->token);
    if (s == NATS_OK && !empty(o->creds_file))
        s = natsOptions_SetUserCredentialsFromFiles(opts, o->creds_file, NULL);
    if (s == NATS_OK && (o->tls || !empty(o->tls_ca) || !empty(o->tls_cert)))
        s = natsOptions_SetSecure(opts, true);
    if (s == NATS_OK && !empty(o->tls_ca))
        s = natsOptions_LoadCATrustedCertificates(opts, o->tls_ca);
    if (s == NATS_OK && !empty(o->tls_cert))
        s = natsOptions_LoadCertificatesChain(opts, o->tls_cert, o->tls_key);
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(opts, o->connect_timeout_ms);
    if (s == NATS_OK)
        s = natsOptions_SetAllowReconnect(opts, o->reconnect_attempts != 0);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(opts, o->reconnect_attempts);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectWait(opts, o->reconnect_wait_ms);
    /* nats.c's default (a PING every 2 minutes, 2 unanswered) leaves a frozen server holding
     * every publish and fetch for minutes while the rest of a cluster has moved on. */
    if (s == NATS_OK)
        s = natsOptions_SetPingInterval(opts, (int64_t)o->ping_interval_ms);
    if (s == NATS_OK)
        s = natsOptions_SetMaxPingsOut(opts, o->max_pings_out);
    /* By default nats.c's flusher waits up to 1 ms to gather writes: a publisher that waits for
     * each ack (one event of a key at a time, a consumer's acks) would wait that long for every
     * message. */
    if (s == NATS_OK)
        s = natsOptions_SetSendAsap(opts, o->send_asap != 0);
    if (s != NATS_OK) {
        natsOptions_Destroy(opts);
        return qx_nats_error(err, s, 0, "NATS options");
    }
    *out = opts;
    return QX_OK;
}

/* ---- open / close ------------------------------------------------------------------------ */

qx_status qx_nats_open(qx_nats **out, const qx_nats_options *o, qx_error *err)
{
    natsOptions *opts = NULL;
    qx_nats *n = NULL;
    natsStatus s;
    qx_status q;
    char *buf;
    size_t bufsize;

    *out = NULL;
    if (o == NULL)
        return qx_error_set(err, QX_ERR_INVALID, "no NATS options");
    bufsize = (o->servers != NULL ? strlen(o->servers) : 0) + 1;
    buf = malloc(bufsize);
    if (buf == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    q = build_options(&opts, o, buf, bufsize, err);
    free(buf); /* nats.c copied the urls */
    if (q != QX_OK)
        return q;

    n = calloc(1, sizeof *n);
    if (n == NULL) {
        natsOptions_Destroy(opts);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    s = natsConnection_Connect(&n->nc, opts); /* nats.c keeps a copy of the options */
    if (s != NATS_OK) {
        natsOptions_Destroy(opts);
        q = qx_nats_error(err, s, 0, "cannot connect to NATS");
        natsConnection_Destroy(n->nc);
        free(n);
        if (q == QX_ERR_INVALID || q == QX_ERR_NOMEM)
            return q;
        /* a timeout, a refusal, bad credentials: all mean "not connected" */
        if (err != NULL)
            err->status = QX_ERR_CONNECTION;
        return QX_ERR_CONNECTION;
    }
    s = natsConnection_JetStream(&n->js, n->nc, NULL);
    if (s != NATS_OK) {
        natsOptions_Destroy(opts);
        q = qx_nats_error(err, s, 0, "JetStream context");
        natsConnection_Destroy(n->nc);
        free(n);
        return q;
    }
    n->opts = opts;
    n->send_asap = o->send_asap != 0;
    pthread_mutex_init(&n->mu, NULL);
    n->refs = 1;
    *out = n;
    return QX_OK;
}

qx_status qx_nats_open_gathering(qx_nats *like, qx_nats **out, qx_error *err)
{
    qx_nats *n;
    natsStatus s;

    *out = NULL;
    if (!like->send_asap) {
        *out = qx_nats_retain(like);
        return QX_OK;
    }
    n = calloc(1, sizeof *n);
    if (n == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    pthread_mutex_lock(&like->mu);
    s = natsOptions_SetSendAsap(like->opts, false);
    if (s == NATS_OK)
        s = natsConnection_Connect(&n->nc, like->opts);
    natsOptions_SetSendAsap(like->opts, true);
    pthread_mutex_unlock(&like->mu);
    if (s == NATS_OK)
        s = natsConnection_JetStream(&n->js, n->nc, NULL);
    if (s != NATS_OK) {
        qx_status q = qx_nats_error(err, s, 0, "cannot open a second NATS connection");
        natsConnection_Destroy(n->nc);
        free(n);
        return q;
    }
    pthread_mutex_init(&n->mu, NULL); /* opts stays NULL: it opens no more connections */
    n->send_asap = 0;
    n->refs = 1;
    *out = n;
    return QX_OK;
}

qx_nats *qx_nats_retain(qx_nats *n)
{
    if (n != NULL)
        __atomic_add_fetch(&n->refs, 1, __ATOMIC_ACQ_REL);
    return n;
}

void qx_nats_close(qx_nats *n)
{
    if (n == NULL)
        return;
    if (__atomic_sub_fetch(&n->refs, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    natsConnection_Close(n->nc); /* flushes what is buffered, then closes; joins its threads */
    while (n->graves != NULL) {
        grave *g = n->graves;
        n->graves = g->next;
        natsSubscription_Destroy(g->sub);
        jsCtx_Destroy(g->js);
        free(g);
    }
    jsCtx_Destroy(n->js);
    natsConnection_Destroy(n->nc);
    natsOptions_Destroy(n->opts);
    pthread_mutex_destroy(&n->mu);
    free(n);
}

/* ---- dropping subscriptions --------------------------------------------------------------- */

/* nats.c before 3.10 (Debian 12 ships 3.4) looks a message's subscription up and then, holding
 * no reference to it, queues the message on it: a subscription destroyed in between is freed
 * under the reading thread, which then locks a freed mutex and can wait on it for ever, leaving
 * the connection deaf (every request times out, closing it hangs). So nothing is destroyed
 * while a message for it may be in that thread. */
static void bury(qx_nats *n, natsSubscription *sub, jsCtx *js)
{
    grave *g = calloc(1, sizeof *g);
    if (g == NULL)
        return; /* leaked rather than freed under the reading thread */
    g->sub = sub;
    g->js = js;
    pthread_mutex_lock(&n->mu);
    g->next = n->graves;
    n->graves = g;
    pthread_mutex_unlock(&n->mu);
}

/* The server sends nothing more to an unsubscribed subject, and answers a PING only after what
 * it sent before it; the reading thread handles the PONG after those messages. */
static int reader_is_past(qx_nats *n)
{
    return natsConnection_Status(n->nc) == NATS_CONN_STATUS_CONNECTED &&
           natsConnection_FlushTimeout(n->nc, 2000) == NATS_OK;
}

void qx_nats_drop_subscription(qx_nats *n, natsSubscription *sub)
{
    if (sub == NULL)
        return;
    natsSubscription_Unsubscribe(sub);
    if (reader_is_past(n))
        natsSubscription_Destroy(sub);
    else
        bury(n, sub, NULL);
}

void qx_nats_drop_context(qx_nats *n, jsCtx *js, int acks_may_come)
{
    if (js == NULL)
        return;
    if (!acks_may_come && reader_is_past(n))
        jsCtx_Destroy(js);
    else
        bury(n, NULL, js);
}

natsConnection *qx_nats_conn(qx_nats *n) { return n->nc; }
jsCtx *qx_nats_js(qx_nats *n) { return n->js; }

/* ---- state ------------------------------------------------------------------------------- */

qx_nats_state qx_nats_get_state(qx_nats *n)
{
    switch (natsConnection_Status(n->nc)) {
    case NATS_CONN_STATUS_CONNECTED:
    case NATS_CONN_STATUS_DRAINING_SUBS:
    case NATS_CONN_STATUS_DRAINING_PUBS:
        return QX_NATS_CONNECTED;
    case NATS_CONN_STATUS_CONNECTING:
        return QX_NATS_CONNECTING;
    case NATS_CONN_STATUS_RECONNECTING:
        return QX_NATS_RECONNECTING;
    case NATS_CONN_STATUS_CLOSED:
        return QX_NATS_CLOSED;
    default:
        return QX_NATS_DISCONNECTED;
    }
}

const char *qx_nats_state_name(qx_nats_state s)
{
    switch (s) {
    case QX_NATS_CONNECTED: return "connected";
    case QX_NATS_CONNECTING: return "connecting";
    case QX_NATS_RECONNECTING: return "reconnecting";
    case QX_NATS_DISCONNECTED: return "disconnected";
    case QX_NATS_CLOSED: return "closed";
    }
    return "unknown";
}

long long qx_nats_reconnects(qx_nats *n)
{
    natsStatistics *st = NULL;
    uint64_t reconnects = 0;
    if (natsStatistics_Create(&st) == NATS_OK && natsConnection_GetStats(n->nc, st) == NATS_OK)
        natsStatistics_GetCounts(st, NULL, NULL, NULL, NULL, &reconnects);
    natsStatistics_Destroy(st);
    return (long long)reconnects;
}

void qx_nats_connected_url(qx_nats *n, char *buf, size_t size)
{
    if (size == 0)
        return;
    buf[0] = '\0';
    if (natsConnection_GetConnectedUrl(n->nc, buf, size) != NATS_OK)
        buf[0] = '\0';
}

int qx_nats_subject_valid(const char *s)
{
    size_t toklen = 0;
    const char *tok = s;
    if (s == NULL || *s == '\0')
        return 0;
    for (;; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '.' || c == '\0') {
            if (toklen == 0)
                return 0; /* empty token: leading, trailing or double dot */
            if (toklen == 1 && (tok[0] == '*' || tok[0] == '>'))
                return 0; /* a wildcard: fine to subscribe to, not to publish to */
            if (c == '\0')
                return 1;
            tok = s + 1;
            toklen = 0;
            continue;
        }
        if (c <= ' ' || c == 0x7f)
            return 0;
        toklen++;
    }
}

/* ---- streams ----------------------------------------------------------------------------- */

qx_status qx_nats_ensure_stream(qx_nats *n, const qx_nats_stream_options *o, qx_error *err)
{
    const char *name = o->name;
    const char *const *subjects = o->subjects;
    int nsubjects = o->nsubjects;
    jsStreamConfig cfg;
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s;
    int i;

    if (n == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "NATS connection is closed");
    if (empty(name) || strpbrk(name, " \t.*>") != NULL)
        return qx_error_set(err, QX_ERR_INVALID, "invalid stream name");
    if (nsubjects <= 0)
        return qx_error_set(err, QX_ERR_INVALID, "a stream needs at least one subject");
    for (i = 0; i < nsubjects; i++)
        if (empty(subjects[i]) || strpbrk(subjects[i], " \t") != NULL)
            return qx_error_set(err, QX_ERR_INVALID, "invalid subject %d", i + 1);

    jsStreamConfig_Init(&cfg);
    cfg.Name = name;
    cfg.Subjects = (const char **)subjects;
    cfg.SubjectsLen = nsubjects;
    cfg.Storage = js_FileStorage;
    if (o->duplicate_window_ms > 0)
        cfg.Duplicates = o->duplicate_window_ms * 1000000; /* nanoseconds */
    if (o->replicas > 0)
        cfg.Replicas = o->replicas;
    if (o->max_msg_size > 0)
        cfg.MaxMsgSize = o->max_msg_size;

    s = js_AddStream(&si, n->js, &cfg, NULL, &jerr);
    if (s != NATS_OK && jerr == JSStreamNameExistErr) {
        /* it exists with another configuration: bring subjects and window up to date */
        jerr = 0;
        s = js_UpdateStream(&si, n->js, &cfg, NULL, &jerr);
    }
    jsStreamInfo_Destroy(si);
    if (s != NATS_OK)
        return qx_nats_error(err, s, jerr, "ensure_stream");
    return QX_OK;
}

qx_status qx_nats_stream_info_get(qx_nats *n, qx_nats_stream_info *out, const char *name,
                                  qx_error *err)
{
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus s;

    memset(out, 0, sizeof *out);
    if (n == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "NATS connection is closed");
    if (empty(name))
        return qx_error_set(err, QX_ERR_INVALID, "invalid stream name");
    s = js_GetStreamInfo(&si, n->js, name, NULL, &jerr);
    if (s != NATS_OK)
        return qx_nats_error(err, s, jerr, "stream_info");
    out->messages = si->State.Msgs;
    out->bytes = si->State.Bytes;
    out->first_seq = si->State.FirstSeq;
    out->last_seq = si->State.LastSeq;
    out->consumers = si->State.Consumers;
    out->subjects = si->State.NumSubjects;
    jsStreamInfo_Destroy(si);
    return QX_OK;
}

void qx_nats_stored_free(qx_nats_stored *m)
{
    int i;
    if (m == NULL)
        return;
    for (i = 0; i < m->nheaders; i++) {
        free(m->keys[i]);
        free(m->values[i]);
    }
    free(m->keys);
    free(m->values);
    free(m->subject);
    free(m->data);
    free(m);
}

qx_status qx_nats_stream_get(qx_nats *n, qx_nats_stored **out, const char *stream,
                             uint64_t seq, qx_error *err)
{
    natsMsg *msg = NULL;
    jsErrCode jerr = 0;
    natsStatus s;
    qx_nats_stored *m;
    const char **keys = NULL;
    int count = 0, i, len;

    *out = NULL;
    if (n == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "NATS connection is closed");
    if (empty(stream))
        return qx_error_set(err, QX_ERR_INVALID, "invalid stream name");
    s = js_GetMsg(&msg, n->js, stream, seq, NULL, &jerr);
    if (s != NATS_OK)
        return qx_nats_error(err, s, jerr, "stream_get");
    m = calloc(1, sizeof *m);
    len = natsMsg_GetDataLength(msg);
    if (m != NULL) {
        m->sequence = natsMsg_GetSequence(msg);
        m->subject = strdup(natsMsg_GetSubject(msg));
        m->data = malloc((size_t)len + 1);
        m->len = len;
        if (m->data != NULL) {
            memcpy(m->data, natsMsg_GetData(msg), (size_t)len);
            m->data[len] = '\0';
        }
    }
    if (m != NULL && natsMsgHeader_Keys(msg, &keys, &count) == NATS_OK && count > 0) {
        m->keys = calloc((size_t)count, sizeof *m->keys);
        m->values = calloc((size_t)count, sizeof *m->values);
        if (m->keys != NULL && m->values != NULL) {
            for (i = 0; i < count; i++) {
                const char *v = NULL;
                natsMsgHeader_Get(msg, keys[i], &v);
                m->keys[i] = strdup(keys[i]);
                m->values[i] = strdup(v != NULL ? v : "");
                m->nheaders++;
            }
        }
    }
    free((void *)keys);
    natsMsg_Destroy(msg);
    if (m == NULL || m->subject == NULL || m->data == NULL ||
        (count > 0 && (m->keys == NULL || m->values == NULL))) {
        qx_nats_stored_free(m);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    for (i = 0; i < m->nheaders; i++) {
        if (m->keys[i] == NULL || m->values[i] == NULL) {
            qx_nats_stored_free(m);
            return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        }
    }
    *out = m;
    return QX_OK;
}

qx_status qx_nats_delete_stream(qx_nats *n, const char *name, qx_error *err)
{
    jsErrCode jerr = 0;
    natsStatus s;
    if (n == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "NATS connection is closed");
    if (empty(name))
        return qx_error_set(err, QX_ERR_INVALID, "invalid stream name");
    s = js_DeleteStream(n->js, name, NULL, &jerr);
    if (s != NATS_OK)
        return qx_nats_error(err, s, jerr, "delete_stream");
    return QX_OK;
}

/* ---- publish ----------------------------------------------------------------------------- */

qx_status qx_nats_publish(qx_nats *n, qx_nats_ack *ack, const char *subject, const void *data,
                          size_t len, const qx_nats_header *headers, int nheaders,
                          const char *msg_id, int timeout_ms, qx_error *err)
{
    natsMsg *msg = NULL;
    jsPubAck *pa = NULL;
    jsPubOptions po;
    jsErrCode jerr = 0;
    natsStatus s;
    int i;

    memset(ack, 0, sizeof *ack);
    if (n == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "NATS connection is closed");
    if (!qx_nats_subject_valid(subject))
        return qx_error_set(err, QX_ERR_INVALID, "invalid subject '%s'",
                            subject != NULL ? subject : "");
    if (len > 0x7fffffff)
        return qx_error_set(err, QX_ERR_INVALID, "message too large");

    s = natsMsg_Create(&msg, subject, NULL, (const char *)data, (int)len);
    for (i = 0; s == NATS_OK && i < nheaders; i++) {
        if (empty(headers[i].key) || headers[i].value == NULL)
            continue;
        s = natsMsgHeader_Set(msg, headers[i].key, headers[i].value);
    }
    if (s != NATS_OK) {
        natsMsg_Destroy(msg);
        return qx_nats_error(err, s, 0, "publish");
    }
    jsPubOptions_Init(&po);
    po.MaxWait = timeout_ms > 0 ? timeout_ms : 5000;
    if (!empty(msg_id))
        po.MsgId = msg_id;
    s = js_PublishMsg(&pa, n->js, msg, &po, &jerr);
    natsMsg_Destroy(msg);
    if (s == NATS_NO_RESPONDERS)
        return qx_error_set(err, QX_ERR_NATS, "publish: no JetStream stream takes subject '%s'",
                            subject);
    if (s != NATS_OK)
        return qx_nats_error(err, s, jerr, "publish");
    snprintf(ack->stream, sizeof ack->stream, "%s", pa->Stream != NULL ? pa->Stream : "");
    ack->sequence = pa->Sequence;
    ack->duplicate = pa->Duplicate ? 1 : 0;
    jsPubAck_Destroy(pa);
    return QX_OK;
}
