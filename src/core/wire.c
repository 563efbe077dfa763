/*
 * PostgreSQL's frontend/backend protocol (3.0) as bytes in and bytes out, for callers that own
 * the socket (see qx.h). This file is the connection: the connection string, the start-up, the
 * state, and the feed, which splits the input into messages and hands each to the start-up, the
 * running batch or the idle connection. Batches (sent, their replies made into qx_results) are
 * in wire_batch.c, authentication in wire_auth.c, the state they share in wire_internal.h.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>
#include <openssl/crypto.h>

#include "internal.h"
#include "qx.h"
#include "wire_internal.h"

#define DEFAULT_SOCKET_DIR "/var/run/postgresql"

/* ---- settings ---------------------------------------------------------------------------- */

static char *dup_first(const char *list)
{
    /* "a,b,c" -> "a": libpq tries several hosts in turn; the caller connects to one */
    size_t n = strcspn(list, ",");
    char *s = malloc(n + 1);
    if (s != NULL) {
        memcpy(s, list, n);
        s[n] = '\0';
    }
    return s;
}

static const char *option(PQconninfoOption *given, PQconninfoOption *defaults, const char *key)
{
    PQconninfoOption *o;
    for (o = given; o != NULL && o->keyword != NULL; o++)
        if (strcmp(o->keyword, key) == 0 && o->val != NULL)
            return o->val;
    for (o = defaults; o != NULL && o->keyword != NULL; o++)
        if (strcmp(o->keyword, key) == 0 && o->val != NULL)
            return o->val;
    return NULL;
}

static char *dup_or_null(const char *s, int *oom)
{
    char *d;
    if (s == NULL)
        return NULL;
    if ((d = strdup(s)) == NULL)
        *oom = 1;
    return d;
}

qx_status qx_wire_new(qx_wire **out, const char *conninfo, qx_error *err)
{
    PQconninfoOption *given, *defaults;
    const char *v, *host, *addr;
    char *msg = NULL, *end;
    qx_wire *w;
    int oom = 0;
    long port;

    *out = NULL;
    if (conninfo == NULL)
        return qx_error_set(err, QX_ERR_INVALID, "no connection string");
    given = PQconninfoParse(conninfo, &msg);
    if (given == NULL) {
        qx_error_set(err, msg != NULL ? QX_ERR_INVALID : QX_ERR_NOMEM, "%s",
                     msg != NULL ? msg : "out of memory");
        if (msg != NULL && err != NULL) {
            size_t k = strlen(err->message);
            while (k > 0 && err->message[k - 1] == '\n')
                err->message[--k] = '\0';
        }
        PQfreemem(msg);
        return err != NULL ? err->status : QX_ERR_INVALID;
    }
    defaults = PQconndefaults();
    v = option(given, defaults, "sslmode");
    if (v != NULL && (strcmp(v, "require") == 0 || strcmp(v, "verify-ca") == 0 ||
                      strcmp(v, "verify-full") == 0)) {
        qx_error_set(err, QX_ERR_INVALID,
                     "sslmode=%s: qx's protocol codec does not do TLS (use sslmode=disable, "
                     "allow or prefer, or a libpq connection)", v);
        goto fail;
    }
    v = option(given, defaults, "gssencmode");
    if (v != NULL && strcmp(v, "require") == 0) {
        qx_error_set(err, QX_ERR_INVALID,
                     "gssencmode=require: qx's protocol codec does not do GSSAPI encryption");
        goto fail;
    }
    v = option(given, defaults, "port");
    port = strtol(v != NULL && *v != '\0' ? v : "5432", &end, 10);
    if ((*end != '\0' && *end != ',') || port < 1 || port > 65535) {
        qx_error_set(err, QX_ERR_INVALID, "invalid port: \"%s\"", v);
        goto fail;
    }
    w = calloc(1, sizeof *w);
    if (w == NULL) {
        qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        goto fail;
    }
    w->port = (int)port;
    addr = option(given, defaults, "hostaddr");
    host = option(given, defaults, "host");
    if (addr != NULL && *addr != '\0')
        w->host = dup_first(addr);
    else
        w->host = dup_first(host != NULL && *host != '\0' ? host : DEFAULT_SOCKET_DIR);
    oom = w->host == NULL;
    if (!oom && w->host[0] == '\0') { /* "host=,other": the first is the default */
        free(w->host);
        oom = (w->host = strdup(DEFAULT_SOCKET_DIR)) == NULL;
    }
    w->user = dup_or_null(option(given, defaults, "user"), &oom);
    w->password = dup_or_null(option(given, defaults, "password"), &oom);
    v = option(given, defaults, "dbname");
    w->dbname = dup_or_null(v != NULL && *v != '\0' ? v : w->user, &oom);
    v = option(given, NULL, "application_name");
    w->appname = dup_or_null(v != NULL ? v : "qx", &oom); /* as qx_conn_open names its own */
    w->options = dup_or_null(option(given, defaults, "options"), &oom);
    if (!oom && (w->user == NULL || w->user[0] == '\0')) {
        qx_wire_free(w);
        qx_error_set(err, QX_ERR_INVALID, "no user name in the connection string");
        goto fail;
    }
    if (oom || !qx_strmap_init(&w->map, CACHE_MAX) ||
        (w->cache = calloc(CACHE_MAX, sizeof *w->cache)) == NULL) {
        qx_wire_free(w);
        qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        goto fail;
    }
    qx_buf_init(&w->out, NULL, 0);
    qx_buf_init(&w->in, NULL, 0);
    w->auth = "";
    w->bfailed = -1;
    PQconninfoFree(given);
    PQconninfoFree(defaults);
    *out = w;
    return QX_OK;
fail:
    PQconninfoFree(given);
    PQconninfoFree(defaults);
    return err != NULL ? err->status : QX_ERR_INVALID;
}

static void wipe_output(qx_wire *w)
{
    if (w->out_secret && w->out.p != NULL)
        OPENSSL_cleanse(w->out.p, w->out.len);
    w->out_secret = 0;
    w->out.len = 0;
    w->out.failed = 0;
}

static void forget_statements(qx_wire *w)
{
    int i;
    for (i = 0; i < w->ncache; i++)
        free(w->cache[i].sql);
    w->ncache = 0;
    qx_strmap_clear(&w->map);
}

static void forget_params(qx_wire *w)
{
    int i;
    for (i = 0; i < w->nparams * 2; i++)
        free(w->params[i]);
    free(w->params);
    w->params = NULL;
    w->nparams = 0;
}

void qx_wire_free(qx_wire *w)
{
    if (w == NULL)
        return;
    if (w->bstate == B_RUNNING)
        qx_wire_end_batch_lost(w, QX_ERR_CONNECTION, "connection lost: %s", "closed");
    if (w->bstate != B_NONE) { /* a batch never ended: its results go with the codec */
        int i;
        for (i = 0; i < w->n; i++) {
            qx_result_free(w->results[i]);
            w->results[i] = NULL;
        }
    }
    qx_result_free(w->partial);
    free(w->parse);
    wipe_output(w);
    qx_buf_free(&w->out);
    qx_buf_free(&w->in);
    forget_statements(w);
    forget_params(w);
    qx_strmap_free(&w->map);
    free(w->cache);
    qx_scram_free(w->scram);
    free(w->host);
    free(w->user);
    if (w->password != NULL) {
        OPENSSL_cleanse(w->password, strlen(w->password));
        free(w->password);
    }
    free(w->dbname);
    free(w->appname);
    free(w->options);
    free(w);
}

const char *qx_wire_host(const qx_wire *w) { return w->host; }
int qx_wire_port(const qx_wire *w) { return w->port; }
int qx_wire_pid(const qx_wire *w) { return w->pid; }
const char *qx_wire_auth(const qx_wire *w) { return w->phase == PH_READY ? w->auth : ""; }
int qx_wire_busy(const qx_wire *w) { return w->bstate != B_NONE; }
int qx_wire_batch_done(const qx_wire *w) { return w->bstate != B_NONE && w->bstate != B_RUNNING; }
int qx_wire_is_broken(const qx_wire *w) { return w->broken; }
int qx_wire_ready(const qx_wire *w)
{
    return w->phase == PH_READY && !w->broken && w->bstate == B_NONE;
}

qx_tx_status qx_wire_tx_status(const qx_wire *w)
{
    if (w->broken)
        return QX_TX_BAD;
    if (w->bstate == B_RUNNING)
        return QX_TX_ACTIVE;
    switch (w->tx) {
    case 'I': return QX_TX_IDLE;
    case 'T': return QX_TX_INTRANS;
    case 'E': return QX_TX_INERROR;
    default: return QX_TX_UNKNOWN;
    }
}

const char *qx_wire_parameter(const qx_wire *w, const char *name)
{
    int i;
    for (i = 0; i < w->nparams; i++)
        if (strcmp(w->params[i * 2], name) == 0)
            return w->params[i * 2 + 1];
    return NULL;
}

/* ---- the conversation ------------------------------------------------------------------- */

void qx_wire_start(qx_wire *w)
{
    size_t at;
    if (w->bstate == B_RUNNING)
        qx_wire_end_batch_lost(w, QX_ERR_CONNECTION, "connection lost: %s",
                               "a new conversation began");
    forget_statements(w);
    forget_params(w);
    wipe_output(w);
    w->in.len = 0;
    w->in.failed = 0;
    qx_scram_free(w->scram);
    w->scram = NULL;
    w->broken = 0;
    w->phase = PH_STARTUP;
    w->auth = "trust";
    w->tx = 0;
    w->pid = 0;

    at = begin_msg(&w->out, 0);
    put_i32(&w->out, PROTOCOL_3_0);
    put_cstr(&w->out, "user");
    put_cstr(&w->out, w->user);
    put_cstr(&w->out, "database");
    put_cstr(&w->out, w->dbname);
    if (w->appname != NULL && w->appname[0] != '\0') {
        put_cstr(&w->out, "application_name");
        put_cstr(&w->out, w->appname);
    }
    if (w->options != NULL && w->options[0] != '\0') {
        put_cstr(&w->out, "options");
        put_cstr(&w->out, w->options);
    }
    qx_buf_append(&w->out, "", 1);
    end_msg(&w->out, at);
    if (w->out.failed)
        w->broken = 1; /* the feed says so: out of memory */
}

const char *qx_wire_output(const qx_wire *w, size_t *len)
{
    *len = w->out.failed ? 0 : w->out.len;
    return *len > 0 ? w->out.p : NULL;
}

void qx_wire_sent(qx_wire *w) { wipe_output(w); }

/* ---- failures ---------------------------------------------------------------------------- */

/* The codec cannot go on: broken, the batch (if one is running) ends with the error. */
qx_status qx_wire_violation(qx_wire *w, int *done, qx_error *err, qx_status s, const char *fmt,
                            const char *what)
{
    char msg[QX_ERR_MESSAGE_MAX];
    snprintf(msg, sizeof msg, fmt, what);
    w->broken = 1;
    if (w->bstate == B_RUNNING) {
        qx_wire_end_batch_lost(w, s, "%s", msg);
        *done = 1;
    } else if (w->phase == PH_STARTUP) {
        *done = 1;
    }
    return qx_error_set(err, s, "%s", msg);
}

void qx_wire_lost(qx_wire *w, const char *why)
{
    if (w->bstate == B_RUNNING)
        qx_wire_end_batch_lost(w, QX_ERR_CONNECTION, "connection lost: %s",
                               why != NULL ? why : "");
    w->broken = 1;
}

/* ---- messages in ------------------------------------------------------------------------- */

int qx_wire_parse_error(const char *body, size_t len, server_error *e)
{
    const char *p = body, *end = body + len, *loc = NULL;
    memset(e, 0, sizeof *e);
    while (p < end && *p != '\0') {
        char code = *p++;
        const char *z = memchr(p, '\0', (size_t)(end - p));
        if (z == NULL)
            return 0;
        switch (code) {
        case 'V': e->severity = p; break; /* not localized */
        case 'S': loc = p; break;
        case 'C': e->sqlstate = p; break;
        case 'M': e->primary = p; break;
        case 'D': e->detail = p; break;
        default: break;
        }
        p = z + 1;
    }
    if (e->severity == NULL)
        e->severity = loc;
    return 1;
}

int qx_wire_is_fatal(const server_error *e)
{
    return e->severity != NULL &&
           (strcmp(e->severity, "FATAL") == 0 || strcmp(e->severity, "PANIC") == 0);
}

qx_status qx_wire_parameter_status(qx_wire *w, const char *body, size_t len)
{
    const char *name = body, *value, *z = memchr(body, '\0', len);
    char **grown, *n, *v;
    int i;
    if (z == NULL || memchr(z + 1, '\0', len - (size_t)(z + 1 - body)) == NULL)
        return QX_ERR_CONNECTION;
    value = z + 1;
    for (i = 0; i < w->nparams; i++) {
        if (strcmp(w->params[i * 2], name) == 0) {
            if ((v = strdup(value)) == NULL)
                return QX_ERR_NOMEM;
            free(w->params[i * 2 + 1]);
            w->params[i * 2 + 1] = v;
            return QX_OK;
        }
    }
    grown = realloc(w->params, sizeof *grown * (size_t)(w->nparams + 1) * 2);
    if (grown == NULL)
        return QX_ERR_NOMEM;
    w->params = grown;
    n = strdup(name);
    v = strdup(value);
    if (n == NULL || v == NULL) {
        free(n);
        free(v);
        return QX_ERR_NOMEM;
    }
    grown[w->nparams * 2] = n;
    grown[w->nparams * 2 + 1] = v;
    w->nparams++;
    return QX_OK;
}

static qx_status startup_message(qx_wire *w, char type, const char *body, size_t len, int *done,
                                 qx_error *err)
{
    server_error e;
    qx_status s;
    switch (type) {
    case 'R':
        if ((s = qx_wire_authenticate(w, body, len, err)) != QX_OK) {
            w->broken = 1;
            *done = 1;
        }
        return s;
    case 'S':
        s = qx_wire_parameter_status(w, body, len);
        if (s != QX_OK)
            return qx_wire_violation(w, done, err, s, "%s",
                                     s == QX_ERR_NOMEM ? "out of memory"
                                                       : "protocol violation: ParameterStatus");
        return QX_OK;
    case 'K':
        if (len != 8)
            return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                     "BackendKeyData");
        w->pid = (int)get_u32(body);
        return QX_OK;
    case 'Z':
        if (len != 1)
            return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                     "ReadyForQuery");
        w->tx = body[0];
        w->phase = PH_READY;
        *done = 1;
        return QX_OK;
    case 'E':
        if (!qx_wire_parse_error(body, len, &e))
            return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                     "ErrorResponse");
        qx_error_server(err, e.sqlstate, e.primary, e.detail);
        if (err != NULL) {
            err->status = QX_ERR_CONNECTION;
            err->retryable = 0;
        }
        w->broken = 1;
        *done = 1;
        return QX_ERR_CONNECTION;
    case 'N': /* a notice */
    case 'v': /* NegotiateProtocolVersion: the server ignores options it does not know */
        return QX_OK;
    default: {
        char what[64];
        snprintf(what, sizeof what, "message '%c' during start-up",
                 type >= 32 && type < 127 ? type : '?');
        return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                 what);
    }
    }
}

/* A message while neither starting up nor in a batch: notices and notifications are dropped,
 * a FATAL (the server going away) breaks the codec. */
static qx_status idle_message(qx_wire *w, char type, const char *body, size_t len, int *done,
                              qx_error *err)
{
    server_error e;
    switch (type) {
    case 'N':
    case 'A':
        return QX_OK;
    case 'S':
        return qx_wire_parameter_status(w, body, len) == QX_OK
                   ? QX_OK
                   : qx_wire_violation(w, done, err, QX_ERR_CONNECTION,
                                       "protocol violation: %s", "ParameterStatus");
    case 'E':
        if (qx_wire_parse_error(body, len, &e)) {
            qx_error_server(err, e.sqlstate, e.primary, e.detail);
            if (err != NULL)
                err->status = QX_ERR_CONNECTION;
            w->broken = 1;
            return QX_ERR_CONNECTION;
        }
        break;
    default:
        break;
    }
    return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                             "a message while idle");
}

qx_status qx_wire_feed(qx_wire *w, const char *data, size_t len, int *done, qx_error *err)
{
    size_t pos = 0;
    qx_status s = QX_OK;

    *done = 0;
    if (w->broken)
        return qx_error_set(err, QX_ERR_CONNECTION, "connection is broken");
    if (len > 0 && !qx_buf_append(&w->in, data, len)) {
        w->in.failed = 0;
        return qx_wire_violation(w, done, err, QX_ERR_NOMEM, "%s", "out of memory");
    }
    while (!*done && s == QX_OK && w->in.len - pos >= 5) {
        const char *m = w->in.p + pos;
        unsigned int mlen = get_u32(m + 1);
        if (mlen < 4 || mlen > MESSAGE_MAX) {
            s = qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                  "a message of an impossible length");
            break;
        }
        if (w->in.len - pos - 1 < mlen)
            break; /* the rest of it has not come yet */
        pos += 1 + (size_t)mlen;
        if (w->phase == PH_STARTUP)
            s = startup_message(w, m[0], m + 5, mlen - 4, done, err);
        else if (w->bstate == B_RUNNING)
            s = qx_wire_batch_message(w, m[0], m + 5, mlen - 4, done, err);
        else if (w->phase == PH_READY)
            s = idle_message(w, m[0], m + 5, mlen - 4, done, err);
        else
            s = qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                  "bytes before the start-up");
    }
    if (w->broken) {
        w->in.len = 0;
    } else if (pos > 0) {
        memmove(w->in.p, w->in.p + pos, w->in.len - pos);
        w->in.len -= pos;
    }
    if (w->in.len == 0 && w->in.cap > 65536)
        qx_buf_free(&w->in); /* a large result passed: give its room back */
    return s;
}
