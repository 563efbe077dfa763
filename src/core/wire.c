/*
 * PostgreSQL's frontend/backend protocol (3.0) as bytes in and bytes out, for callers that own
 * the socket (see qx.h). A batch is sent as conn.c sends it through libpq's pipeline: per
 * statement a Parse the first time its text is met on this connection, then Bind, Describe
 * (portal) and Execute, and one Sync for them all; the replies become qx_results of the same
 * shape libpq makes. Authentication is in wire_auth.c, the state both share in wire_internal.h.
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

static void end_batch_lost(qx_wire *w, qx_status s, const char *fmt, const char *why);

void qx_wire_free(qx_wire *w)
{
    if (w == NULL)
        return;
    if (w->bstate == B_RUNNING)
        end_batch_lost(w, QX_ERR_CONNECTION, "connection lost: %s", "closed");
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
        end_batch_lost(w, QX_ERR_CONNECTION, "connection lost: %s", "a new conversation began");
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
static qx_status violation(qx_wire *w, int *done, qx_error *err, qx_status s, const char *fmt,
                           const char *what)
{
    char msg[QX_ERR_MESSAGE_MAX];
    snprintf(msg, sizeof msg, fmt, what);
    w->broken = 1;
    if (w->bstate == B_RUNNING) {
        end_batch_lost(w, s, "%s", msg);
        *done = 1;
    } else if (w->phase == PH_STARTUP) {
        *done = 1;
    }
    return qx_error_set(err, s, "%s", msg);
}

/* ---- messages in ------------------------------------------------------------------------- */

typedef struct server_error {
    const char *severity, *sqlstate, *primary, *detail;
} server_error;

static int parse_error(const char *body, size_t len, server_error *e)
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

static int is_fatal(const server_error *e)
{
    return e->severity != NULL &&
           (strcmp(e->severity, "FATAL") == 0 || strcmp(e->severity, "PANIC") == 0);
}

static qx_status parameter_status(qx_wire *w, const char *body, size_t len)
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
        s = parameter_status(w, body, len);
        if (s != QX_OK)
            return violation(w, done, err, s, "%s", s == QX_ERR_NOMEM ? "out of memory"
                                                    : "protocol violation: ParameterStatus");
        return QX_OK;
    case 'K':
        if (len != 8)
            return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                             "BackendKeyData");
        w->pid = (int)get_u32(body);
        return QX_OK;
    case 'Z':
        if (len != 1)
            return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                             "ReadyForQuery");
        w->tx = body[0];
        w->phase = PH_READY;
        *done = 1;
        return QX_OK;
    case 'E':
        if (!parse_error(body, len, &e))
            return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
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
        return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s", what);
    }
    }
}

/* ---- batches ----------------------------------------------------------------------------- */

/* Compacts the cache when failed Parses left dropped slots and it is full. */
static void cache_rebuild(qx_wire *w)
{
    int i, k = 0;
    qx_strmap_clear(&w->map);
    for (i = 0; i < w->ncache; i++) {
        if (w->cache[i].dropped) {
            free(w->cache[i].sql);
            continue;
        }
        w->cache[k] = w->cache[i];
        qx_strmap_swap(&w->map, w->cache[k].sql, k);
        k++;
    }
    w->ncache = k;
}

/* The cache index of sql, added when new (*added = 1); -1 when the cache is full or memory ran
 * out: the statement then runs unnamed. */
static int cache_lookup(qx_wire *w, const char *sql, int *added)
{
    int i = qx_strmap_get(&w->map, sql);
    cached_stmt *c;
    *added = 0;
    if (i >= 0 && !w->cache[i].dropped)
        return i;
    if (i >= 0) { /* its Parse failed once: try it again, under a new name */
        c = &w->cache[i];
        c->dropped = 0;
        c->prepared = 0;
        snprintf(c->name, sizeof c->name, "qxw%u", ++w->next_id);
        *added = 1;
        return i;
    }
    if (w->ncache >= CACHE_MAX)
        return -1;
    c = &w->cache[w->ncache];
    if ((c->sql = strdup(sql)) == NULL)
        return -1;
    c->prepared = 0;
    c->dropped = 0;
    snprintf(c->name, sizeof c->name, "qxw%u", ++w->next_id);
    qx_strmap_swap(&w->map, c->sql, w->ncache);
    *added = 1;
    return w->ncache++;
}

static void cache_drop(qx_wire *w, int i)
{
    w->cache[i].dropped = 1; /* the map keeps its key (no deletion): a rebuild compacts */
    w->cache[i].prepared = 0;
}

qx_status qx_wire_batch(qx_wire *w, qx_result **results, const qx_stmt *stmts, int n, int keep,
                        qx_error *err)
{
    size_t at, start = w->out.len;
    int i, k;

    for (i = 0; i < n; i++)
        results[i] = NULL;
    if (w->broken)
        return qx_error_set(err, QX_ERR_CONNECTION, "connection is broken");
    if (w->phase != PH_READY)
        return qx_error_set(err, QX_ERR_INVALID, "the connection's start-up is not done");
    if (w->bstate != B_NONE)
        return qx_error_set(err, QX_ERR_INVALID, "another batch is in progress");
    if (n < 0)
        return qx_error_set(err, QX_ERR_INVALID, "a batch of %d statements", n);
    for (i = 0; i < n; i++)
        if (stmts[i].sql == NULL || stmts[i].nparams < 0 || stmts[i].nparams > 65535)
            return qx_error_set(err, QX_ERR_INVALID, "statement %d: no SQL or too many "
                                "parameters", i + 1);
    if (w->ncache >= CACHE_MAX)
        cache_rebuild(w); /* the dropped texts' slots, if any, come back */
    free(w->parse);
    w->parse = n > 0 ? malloc(sizeof *w->parse * (size_t)n) : NULL;
    if (n > 0 && w->parse == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");

    for (i = 0; i < n; i++) {
        const qx_stmt *s = &stmts[i];
        int added, c = cache_lookup(w, s->sql, &added);
        const char *name = c >= 0 ? w->cache[c].name : "";
        w->parse[i] = -1;
        if (c < 0 || added) {
            at = begin_msg(&w->out, 'P');
            put_cstr(&w->out, name);
            put_cstr(&w->out, s->sql);
            put_i16(&w->out, 0); /* the server infers the parameters' types */
            end_msg(&w->out, at);
            w->parse[i] = c >= 0 ? c : CACHE_MAX; /* CACHE_MAX: the unnamed statement */
        }
        at = begin_msg(&w->out, 'B');
        put_cstr(&w->out, "");
        put_cstr(&w->out, name);
        put_i16(&w->out, 0); /* every parameter in text */
        put_i16(&w->out, (unsigned int)s->nparams);
        for (k = 0; k < s->nparams; k++) {
            const char *v = s->values[k];
            size_t len;
            if (v == NULL) {
                put_i32(&w->out, 0xffffffffu); /* -1: NULL */
                continue;
            }
            len = s->lengths != NULL ? (size_t)s->lengths[k] : strlen(v);
            put_i32(&w->out, (unsigned int)len);
            qx_buf_append(&w->out, v, len);
        }
        put_i16(&w->out, 0); /* every result column in text */
        end_msg(&w->out, at);
        at = begin_msg(&w->out, 'D');
        qx_buf_append(&w->out, "P", 2); /* the portal "" */
        end_msg(&w->out, at);
        at = begin_msg(&w->out, 'E');
        put_cstr(&w->out, "");
        put_i32(&w->out, 0); /* every row */
        end_msg(&w->out, at);
    }
    at = begin_msg(&w->out, 'S');
    end_msg(&w->out, at);
    if (w->out.failed) {
        /* take back what this batch added (and the statements it added to the cache) */
        w->out.failed = 0;
        w->out.len = start;
        for (i = 0; i < n; i++)
            if (w->parse[i] >= 0 && w->parse[i] < CACHE_MAX)
                cache_drop(w, w->parse[i]);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    w->results = results;
    w->n = n;
    w->keep = keep;
    w->cur = 0;
    w->skipping = 0;
    w->copying = 0;
    w->prows = 0;
    w->bstatus = QX_OK;
    w->bfailed = -1;
    qx_error_clear(&w->berr);
    w->bstate = B_RUNNING;
    return QX_OK;
}

/* The first failure of the batch is the one reported. */
static void batch_fail(qx_wire *w, int index, const qx_error *e)
{
    if (w->bstatus != QX_OK)
        return;
    w->bstatus = e->status;
    w->berr = *e;
    w->bfailed = index;
}

static void drop_partial(qx_wire *w)
{
    qx_result_free(w->partial);
    w->partial = NULL;
    w->prows = 0;
}

/* Statements whose Parse never completed are not on the server: out of the cache. */
static void drop_unparsed(qx_wire *w)
{
    int i;
    for (i = 0; i < w->n; i++)
        if (w->parse[i] >= 0 && w->parse[i] < CACHE_MAX && !w->cache[w->parse[i]].prepared &&
            !w->cache[w->parse[i]].dropped)
            cache_drop(w, w->parse[i]);
}

static void end_batch_lost(qx_wire *w, qx_status s, const char *fmt, const char *why)
{
    qx_error e;
    qx_error_set(&e, s, fmt, why);
    batch_fail(w, w->cur < w->n ? w->cur : -1, &e);
    drop_partial(w);
    drop_unparsed(w);
    w->broken = 1;
    w->bstate = B_ENDED;
}

void qx_wire_lost(qx_wire *w, const char *why)
{
    if (w->bstate == B_RUNNING)
        end_batch_lost(w, QX_ERR_CONNECTION, "connection lost: %s", why != NULL ? why : "");
    w->broken = 1;
}

/* A number at the end of a command tag that counts rows, as libpq's PQcmdTuples reads it. */
static long long tag_rows(const char *tag, size_t len)
{
    static const char *const counted[] = { "INSERT ", "UPDATE ", "DELETE ", "SELECT ", "MOVE ",
                                           "FETCH ", "COPY ", "MERGE ", NULL };
    const char *p;
    long long v = 0;
    int i, found = 0;
    for (i = 0; counted[i] != NULL && !found; i++)
        found = strncmp(tag, counted[i], strlen(counted[i])) == 0;
    if (!found || len == 0)
        return 0;
    p = tag + len;
    while (p > tag && p[-1] >= '0' && p[-1] <= '9')
        p--;
    if (p == tag + len || p[-1] != ' ')
        return 0;
    for (; p < tag + len; p++)
        v = v * 10 + (*p - '0');
    return v;
}

static qx_status row_description(qx_wire *w, const char *body, size_t len)
{
    char *local_names[32], **names = local_names;
    unsigned int local_types[32], *types = local_types;
    const char *p = body + 2, *end = body + len;
    int ncols, i, ok = 1;

    if (len < 2 || (ncols = get_i16(body)) < 0)
        return QX_ERR_CONNECTION;
    if (ncols > 32) {
        names = malloc(sizeof *names * (size_t)ncols);
        types = malloc(sizeof *types * (size_t)ncols);
    }
    if (names == NULL || types == NULL)
        ok = -1;
    for (i = 0; i < ncols && ok == 1; i++) {
        const char *z = memchr(p, '\0', (size_t)(end - p));
        if (z == NULL || end - (z + 1) < 18) {
            ok = 0;
            break;
        }
        names[i] = (char *)(uintptr_t)p;
        types[i] = get_u32(z + 1 + 6);
        p = z + 1 + 18;
    }
    if (ok == 1) {
        drop_partial(w);
        if ((w->partial = qx_result_make(1, ncols, names, types)) == NULL)
            ok = -1;
    }
    if (names != local_names)
        free(names);
    if (types != local_types)
        free(types);
    return ok == 1 ? QX_OK : ok == 0 ? QX_ERR_CONNECTION : QX_ERR_NOMEM;
}

static qx_status data_row(qx_wire *w, const char *body, size_t len)
{
    const char *p = body + 2, *end = body + len;
    int ncols, i;
    if (w->partial == NULL || len < 2 || (ncols = get_i16(body)) != qx_result_ncols(w->partial))
        return QX_ERR_CONNECTION;
    for (i = 0; i < ncols; i++) {
        unsigned int n;
        if (end - p < 4)
            return QX_ERR_CONNECTION;
        n = get_u32(p);
        p += 4;
        if (n == 0xffffffffu) {
            if (!qx_result_set(w->partial, w->prows, i, NULL, -1))
                return QX_ERR_NOMEM;
            continue;
        }
        if (n > (size_t)(end - p))
            return QX_ERR_CONNECTION;
        if (!qx_result_set(w->partial, w->prows, i, p, (int)n))
            return QX_ERR_NOMEM;
        p += n;
    }
    if (ncols == 0)
        return QX_OK; /* a row of no columns (SELECT FROM t) has no place to go */
    w->prows++;
    return p == end ? QX_OK : QX_ERR_CONNECTION;
}

/* The statement w->cur is complete: its result (made now for a command without one). */
static qx_status statement_done(qx_wire *w, long long affected)
{
    qx_result *r = w->partial;
    if (r == NULL && (r = qx_result_make(0, 0, NULL, NULL)) == NULL)
        return QX_ERR_NOMEM;
    qx_result_set_affected(r, affected);
    w->partial = NULL;
    w->prows = 0;
    w->results[w->cur++] = r;
    return QX_OK;
}

static qx_status batch_message(qx_wire *w, char type, const char *body, size_t len, int *done,
                               qx_error *err)
{
    server_error e;
    qx_error se;
    qx_status s = QX_OK;
    int in_stmt = w->cur < w->n;

    if (w->copying && type != 'd' && type != 'c' && type != 'C' && type != 'E' &&
        type != 'N' && type != 'S' && type != 'A')
        return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                         "unexpected message during COPY");
    if (w->skipping && type != 'Z' && type != 'N' && type != 'S' && type != 'A' && type != 'E')
        return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                         "a message after an error before ReadyForQuery");
    switch (type) {
    case '1': /* ParseComplete */
        if (!in_stmt || w->parse[w->cur] < 0)
            break;
        if (w->parse[w->cur] < CACHE_MAX)
            w->cache[w->parse[w->cur]].prepared = 1;
        return QX_OK;
    case '2': /* BindComplete */
        if (!in_stmt)
            break;
        return QX_OK;
    case 'T':
        if (!in_stmt)
            break;
        s = row_description(w, body, len);
        if (s != QX_OK)
            break;
        return QX_OK;
    case 'n': /* NoData: a command */
        if (!in_stmt)
            break;
        drop_partial(w);
        return QX_OK;
    case 'D':
        if (!in_stmt)
            break;
        s = data_row(w, body, len);
        if (s != QX_OK)
            break;
        return QX_OK;
    case 'C': { /* CommandComplete */
        const char *z = memchr(body, '\0', len);
        if (!in_stmt || z == NULL)
            break;
        w->copying = 0;
        s = statement_done(w, tag_rows(body, (size_t)(z - body)));
        if (s != QX_OK)
            break;
        return QX_OK;
    }
    case 'I': /* EmptyQueryResponse: nothing done, and the server goes on */
        if (!in_stmt)
            break;
        drop_partial(w);
        s = statement_done(w, 0);
        if (s != QX_OK)
            break;
        return QX_OK;
    case 'H': /* CopyOutResponse: the rows are read and dropped */
        if (!in_stmt)
            break;
        w->copying = 1;
        return QX_OK;
    case 'd': /* CopyData */
    case 'c': /* CopyDone */
        if (!w->copying)
            break;
        return QX_OK;
    case 'G': /* CopyInResponse: the server would read what follows as the copy's data */
        if (!in_stmt)
            break;
        qx_error_set(&se, QX_ERR_INVALID,
                     "COPY FROM STDIN is not supported (the connection is closed)");
        batch_fail(w, w->cur, &se);
        drop_partial(w);
        drop_unparsed(w);
        w->broken = 1;
        w->bstate = B_ENDED;
        *done = 1;
        return QX_OK;
    case 'W':
        return violation(w, done, err, QX_ERR_CONNECTION, "%s",
                         "CopyBothResponse (replication) is not supported by qx's protocol "
                         "codec");
    case 'E':
        if (!parse_error(body, len, &e))
            break;
        qx_error_server(&se, e.sqlstate, e.primary, e.detail);
        if (is_fatal(&e)) {
            se.status = QX_ERR_CONNECTION;
            se.retryable = 0;
            batch_fail(w, in_stmt ? w->cur : -1, &se);
            end_batch_lost(w, QX_ERR_CONNECTION, "%s", se.message);
            *done = 1;
            return QX_OK;
        }
        /* the server skips to the Sync: the statements after this one get no result; an
         * error after the last statement is the implicit transaction's commit (-1) */
        batch_fail(w, in_stmt ? w->cur : -1, &se);
        drop_partial(w);
        w->copying = 0;
        w->skipping = 1;
        return QX_OK;
    case 'N':
    case 'A':
        return QX_OK;
    case 'S':
        s = parameter_status(w, body, len);
        if (s != QX_OK)
            break;
        return QX_OK;
    case 'Z':
        if (len != 1 || (in_stmt && !w->skipping))
            break;
        w->tx = body[0];
        drop_unparsed(w);
        w->bstate = B_ENDED;
        *done = 1;
        return QX_OK;
    default:
        break;
    }
    if (s == QX_ERR_NOMEM)
        return violation(w, done, err, QX_ERR_NOMEM, "%s", "out of memory");
    {
        char what[64];
        snprintf(what, sizeof what, "unexpected message '%c'",
                 type >= 32 && type < 127 ? type : '?');
        return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s", what);
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
        return parameter_status(w, body, len) == QX_OK
                   ? QX_OK
                   : violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                               "ParameterStatus");
    case 'E':
        if (parse_error(body, len, &e)) {
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
    return violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
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
        return violation(w, done, err, QX_ERR_NOMEM, "%s", "out of memory");
    }
    while (!*done && s == QX_OK && w->in.len - pos >= 5) {
        const char *m = w->in.p + pos;
        unsigned int mlen = get_u32(m + 1);
        if (mlen < 4 || mlen > MESSAGE_MAX) {
            s = violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                          "a message of an impossible length");
            break;
        }
        if (w->in.len - pos - 1 < mlen)
            break; /* the rest of it has not come yet */
        pos += 1 + (size_t)mlen;
        if (w->phase == PH_STARTUP)
            s = startup_message(w, m[0], m + 5, mlen - 4, done, err);
        else if (w->bstate == B_RUNNING)
            s = batch_message(w, m[0], m + 5, mlen - 4, done, err);
        else if (w->phase == PH_READY)
            s = idle_message(w, m[0], m + 5, mlen - 4, done, err);
        else
            s = violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
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

qx_status qx_wire_batch_end(qx_wire *w, int *failed, qx_error *err)
{
    qx_status s;
    int i;
    *failed = -1;
    if (w->bstate == B_NONE)
        return qx_error_set(err, QX_ERR_INVALID, "no batch to end");
    if (w->bstate == B_RUNNING)
        return qx_error_set(err, QX_ERR_INVALID, "the batch has not ended yet");
    s = w->bstatus;
    if (s != QX_OK) {
        *failed = w->bfailed;
        if (err != NULL)
            *err = w->berr;
        if (!w->keep)
            for (i = 0; i < w->n; i++) {
                qx_result_free(w->results[i]);
                w->results[i] = NULL;
            }
    }
    w->bstate = B_NONE;
    w->results = NULL;
    free(w->parse);
    w->parse = NULL;
    return s;
}
