/*
 * The wire codec's batches (see wire.c): sent as conn.c sends them through libpq's pipeline: per
 * statement a Parse the first time its text is met on this connection, then Bind, Describe
 * (portal) and Execute, and one Sync for them all; the replies, which wire.c's feed hands over
 * while a batch runs, become qx_results of the same shape libpq makes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "qx.h"
#include "wire_internal.h"

/* ---- the prepared statements ------------------------------------------------------------- */

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

/* ---- sending ----------------------------------------------------------------------------- */

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

/* ---- the replies ------------------------------------------------------------------------- */

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

void qx_wire_end_batch_lost(qx_wire *w, qx_status s, const char *fmt, const char *why)
{
    qx_error e;
    qx_error_set(&e, s, fmt, why);
    batch_fail(w, w->cur < w->n ? w->cur : -1, &e);
    drop_partial(w);
    drop_unparsed(w);
    w->broken = 1;
    w->bstate = B_ENDED;
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

qx_status qx_wire_batch_message(qx_wire *w, char type, const char *body, size_t len, int *done,
                                qx_error *err)
{
    server_error e;
    qx_error se;
    qx_status s = QX_OK;
    int in_stmt = w->cur < w->n;

    if (w->copying && type != 'd' && type != 'c' && type != 'C' && type != 'E' &&
        type != 'N' && type != 'S' && type != 'A')
        return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                 "unexpected message during COPY");
    if (w->skipping && type != 'Z' && type != 'N' && type != 'S' && type != 'A' && type != 'E')
        return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
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
        return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "%s",
                                 "CopyBothResponse (replication) is not supported by qx's "
                                 "protocol codec");
    case 'E':
        if (!qx_wire_parse_error(body, len, &e))
            break;
        qx_error_server(&se, e.sqlstate, e.primary, e.detail);
        if (qx_wire_is_fatal(&e)) {
            se.status = QX_ERR_CONNECTION;
            se.retryable = 0;
            batch_fail(w, in_stmt ? w->cur : -1, &se);
            qx_wire_end_batch_lost(w, QX_ERR_CONNECTION, "%s", se.message);
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
        s = qx_wire_parameter_status(w, body, len);
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
        return qx_wire_violation(w, done, err, QX_ERR_NOMEM, "%s", "out of memory");
    {
        char what[64];
        snprintf(what, sizeof what, "unexpected message '%c'",
                 type >= 32 && type < 127 ? type : '?');
        return qx_wire_violation(w, done, err, QX_ERR_CONNECTION, "protocol violation: %s",
                                 what);
    }
}

/* ---- the outcome ------------------------------------------------------------------------- */

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
