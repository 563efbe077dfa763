/*
 * One PostgreSQL connection.
 *
 * Every statement goes through qx_conn_batch: the statements of a batch are sent in libpq's
 * pipeline mode and one Sync, so a unit of work's queued writes, its outbox insert and its COMMIT
 * cost one round trip. Each distinct SQL text is prepared once per connection (the Parse travels
 * in the same pipeline as its first execution), so the server plans it once.
 */
#include <errno.h>
#include <stdint.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "internal.h"
#include "qx.h"

#define STMT_CACHE_SLOTS 512 /* power of two; at most 3/4 used */
#define STMT_CACHE_MAX (STMT_CACHE_SLOTS / 4 * 3)

typedef struct stmt_entry {
    char *sql;          /* NULL: empty slot */
    unsigned int hash;
    unsigned int id;
    char name[16];      /* "qx_<id>", the server-side statement name */
    int prepared;       /* the server has it */
    int tombstone;
} stmt_entry;

struct qx_conn {
    PGconn *pg;
    int broken;
    int listening; /* LISTEN was run: UNLISTEN before the next user gets it */
    double created_at;
    unsigned int next_id;
    int cached;
    int tombstones; /* slots freed by a failed prepare; they lengthen probes until a rehash */
    stmt_entry cache[STMT_CACHE_SLOTS];
};

/* ---- results ----------------------------------------------------------------------------- */

/* A result: libpq's, from a batch here or made by the wire codec from the protocol's messages,
 * and the rows it touched when that is known without asking libpq (the codec's, read from the
 * CommandComplete tag). */
struct qx_result {
    PGresult *pg;
    long long affected; /* < 0: PQcmdTuples tells */
};

/* Wraps a PGresult; clears it and returns NULL when memory ran out. */
static qx_result *wrap_result(PGresult *pg)
{
    qx_result *r = malloc(sizeof *r);
    if (r == NULL) {
        PQclear(pg);
        return NULL;
    }
    r->pg = pg;
    r->affected = -1;
    return r;
}

int qx_result_nrows(const qx_result *r) { return PQntuples(r->pg); }
int qx_result_ncols(const qx_result *r) { return PQnfields(r->pg); }
const char *qx_result_colname(const qx_result *r, int col) { return PQfname(r->pg, col); }
unsigned int qx_result_coltype(const qx_result *r, int col) { return PQftype(r->pg, col); }
int qx_result_isnull(const qx_result *r, int row, int col) { return PQgetisnull(r->pg, row, col); }
const char *qx_result_value(const qx_result *r, int row, int col)
{
    return PQgetvalue(r->pg, row, col);
}
int qx_result_length(const qx_result *r, int row, int col) { return PQgetlength(r->pg, row, col); }
long long qx_result_affected(const qx_result *r)
{
    const char *n;
    if (r->affected >= 0)
        return r->affected;
    n = PQcmdTuples(r->pg);
    return (n != NULL && *n != '\0') ? atoll(n) : 0;
}
void qx_result_free(qx_result *r)
{
    if (r == NULL)
        return;
    PQclear(r->pg);
    free(r);
}

/* ---- results made from the protocol's messages (the wire codec) ------------------------- */

qx_result *qx_result_make(int rows, int ncols, char *const *names, const unsigned int *types)
{
    PGresAttDesc local[16], *attrs = local;
    PGresult *pg = PQmakeEmptyPGresult(NULL, rows ? PGRES_TUPLES_OK : PGRES_COMMAND_OK);
    qx_result *r;
    int i, ok = 1;

    if (pg == NULL)
        return NULL;
    if (ncols > 0) {
        if (ncols > (int)(sizeof local / sizeof local[0]) &&
            (attrs = malloc(sizeof *attrs * (size_t)ncols)) == NULL) {
            PQclear(pg);
            return NULL;
        }
        for (i = 0; i < ncols; i++) {
            attrs[i].name = names[i];
            attrs[i].tableid = 0;
            attrs[i].columnid = 0;
            attrs[i].format = 0;
            attrs[i].typid = types[i];
            attrs[i].typlen = -1;
            attrs[i].atttypmod = -1;
        }
        ok = PQsetResultAttrs(pg, ncols, attrs);
        if (attrs != local)
            free(attrs);
        if (!ok) {
            PQclear(pg);
            return NULL;
        }
    }
    if ((r = wrap_result(pg)) != NULL)
        r->affected = 0;
    return r;
}

int qx_result_set(qx_result *r, int row, int col, const char *value, int len)
{
    /* PQsetvalue takes a NULL value (or length -1) as SQL NULL, and copies the bytes */
    return PQsetvalue(r->pg, row, col, len < 0 ? NULL : (char *)(uintptr_t)value,
                      len < 0 ? -1 : len);
}

void qx_result_set_affected(qx_result *r, long long n) { r->affected = n; }

void qx_free(void *p) { PQfreemem(p); }

qx_status qx_bytea_decode(unsigned char **out, size_t *outlen, const char *text, qx_error *err)
{
    *out = PQunescapeBytea((const unsigned char *)text, outlen);
    if (*out == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory decoding bytea");
    return QX_OK;
}

/* ---- errors ------------------------------------------------------------------------------ */

static void trim_newline(char *s)
{
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' '))
        s[--n] = '\0';
}

/* Fills err from a failed result (or from the connection when res is NULL). The message is the
 * server's primary message, with its detail when there is one. */
static qx_status result_error(qx_conn *c, const PGresult *res, qx_error *err)
{
    const char *st = res != NULL ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = res != NULL ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *detail = res != NULL ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
    int retryable = 0;
    qx_status s;

    if (PQstatus(c->pg) == CONNECTION_BAD) {
        c->broken = 1;
        s = QX_ERR_CONNECTION;
    } else if (st != NULL) {
        s = qx_status_from_sqlstate(st, &retryable);
    } else {
        s = QX_ERR_DB;
    }
    if (err != NULL) {
        if (primary != NULL) {
            qx_error_server(err, st, primary, detail);
            err->status = s; /* a lost connection wins over the SQLSTATE */
        } else {
            qx_error_set(err, s, "%s", PQerrorMessage(c->pg));
            trim_newline(err->message);
            if (st != NULL)
                snprintf(err->sqlstate, sizeof err->sqlstate, "%s", st);
        }
        err->retryable = retryable;
    }
    return s;
}

static qx_status conn_error(qx_conn *c, qx_error *err)
{
    if (PQstatus(c->pg) == CONNECTION_BAD)
        c->broken = 1;
    if (err != NULL) {
        qx_error_set(err, c->broken ? QX_ERR_CONNECTION : QX_ERR_DB, "%s",
                     PQerrorMessage(c->pg));
        trim_newline(err->message);
    }
    return c->broken ? QX_ERR_CONNECTION : QX_ERR_DB;
}

/* Server notices (e.g. "already exists, skipping") are not errors; libpq would print them.
 * A FATAL that arrives while the connection is idle (pg_terminate_backend, a server shutdown)
 * also comes this way, before the server closes the socket: it marks the connection broken so
 * the pool does not hand it out again. */
static void on_notice(void *arg, const PGresult *res)
{
    qx_conn *c = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    if (sev != NULL && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0))
        c->broken = 1;
}

/* ---- open / close ------------------------------------------------------------------------ */

qx_status qx_conn_open(qx_conn **out, const char *conninfo, int connect_timeout_ms,
                       qx_error *err)
{
    const char *keys[4], *vals[4];
    char timeout[16];
    int k = 0;
    qx_conn *c;

    *out = NULL;
    if (conninfo == NULL)
        return qx_error_set(err, QX_ERR_INVALID, "no connection string");
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");

    keys[k] = "application_name", vals[k++] = "qx";
    keys[k] = "dbname", vals[k++] = conninfo; /* expanded: a URL or key=value string */
    /* libpq's connect_timeout: whole seconds (at least 2), counted on a seconds clock, so the
     * attempt ends within a second either side of it */
    if (connect_timeout_ms > 0) {
        snprintf(timeout, sizeof timeout, "%d", (connect_timeout_ms + 999) / 1000);
        keys[k] = "connect_timeout", vals[k++] = timeout;
    }
    keys[k] = NULL, vals[k] = NULL;

    c->pg = PQconnectdbParams(keys, vals, 1);
    if (c->pg == NULL) {
        free(c);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    if (PQstatus(c->pg) != CONNECTION_OK) {
        qx_error_set(err, QX_ERR_CONNECTION, "%s", PQerrorMessage(c->pg));
        if (err != NULL)
            trim_newline(err->message);
        PQfinish(c->pg); /* also after a failed attempt */
        free(c);
        return QX_ERR_CONNECTION;
    }
    PQsetNoticeReceiver(c->pg, on_notice, c);
    c->created_at = qx_clock();
    *out = c;
    return QX_OK;
}

void qx_conn_close(qx_conn *c)
{
    int i;
    if (c == NULL)
        return;
    PQfinish(c->pg);
    for (i = 0; i < STMT_CACHE_SLOTS; i++)
        free(c->cache[i].sql);
    free(c);
}

qx_tx_status qx_conn_tx_status(const qx_conn *c)
{
    if (c->broken || PQstatus(c->pg) != CONNECTION_OK)
        return QX_TX_BAD;
    switch (PQtransactionStatus(c->pg)) {
    case PQTRANS_IDLE: return QX_TX_IDLE;
    case PQTRANS_ACTIVE: return QX_TX_ACTIVE;
    case PQTRANS_INTRANS: return QX_TX_INTRANS;
    case PQTRANS_INERROR: return QX_TX_INERROR;
    default: return QX_TX_UNKNOWN;
    }
}

const char *qx_tx_status_name(qx_tx_status s)
{
    static const char *const names[] = { "idle", "active", "intrans", "inerror", "unknown",
                                         "bad" };
    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "unknown";
}

int qx_conn_pid(const qx_conn *c) { return PQbackendPID(c->pg); }
int qx_conn_socket(const qx_conn *c) { return PQsocket(c->pg); }
int qx_conn_is_broken(const qx_conn *c) { return c->broken || PQstatus(c->pg) != CONNECTION_OK; }
double qx_conn_created_at(const qx_conn *c) { return c->created_at; }

/* ---- statement cache --------------------------------------------------------------------- */

/* A hash of the SQL text, eight bytes at a step (a byte at a time cost more than the rest of a
 * short statement's lookup); the text is compared in full on a hit anyway. */
static unsigned int hash_sql(const char *s)
{
    size_t n = strlen(s), i;
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ n, w;
    for (i = 0; i + 8 <= n; i += 8) {
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    w = 0;
    memcpy(&w, s + i, n - i);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 29;
    return (unsigned int)h;
}

static stmt_entry *cache_find(qx_conn *c, const char *sql, unsigned int h)
{
    unsigned int i = h & (STMT_CACHE_SLOTS - 1), probes;
    for (probes = 0; probes < STMT_CACHE_SLOTS; probes++) {
        stmt_entry *e = &c->cache[i];
        if (e->sql == NULL && !e->tombstone)
            return NULL;
        if (e->sql != NULL && e->hash == h && strcmp(e->sql, sql) == 0)
            return e;
        i = (i + 1) & (STMT_CACHE_SLOTS - 1);
    }
    return NULL; /* every slot probed: tombstones everywhere else */
}

/* Puts the live entries back without tombstones, which failed prepares of distinct texts leave
 * behind until every lookup probes the whole table. Only between batches: a batch holds
 * pointers to entries. */
static void cache_rehash(qx_conn *c)
{
    stmt_entry live[STMT_CACHE_MAX];
    int n = 0, i;
    for (i = 0; i < STMT_CACHE_SLOTS; i++)
        if (c->cache[i].sql != NULL && n < STMT_CACHE_MAX)
            live[n++] = c->cache[i];
    memset(c->cache, 0, sizeof c->cache);
    for (i = 0; i < n; i++) {
        unsigned int k = live[i].hash & (STMT_CACHE_SLOTS - 1);
        while (c->cache[k].sql != NULL)
            k = (k + 1) & (STMT_CACHE_SLOTS - 1);
        c->cache[k] = live[i];
    }
    c->tombstones = 0;
}

static stmt_entry *cache_add(qx_conn *c, const char *sql, unsigned int h)
{
    unsigned int i;
    if (c->cached >= STMT_CACHE_MAX)
        return NULL; /* full: further texts run unnamed */
    i = h & (STMT_CACHE_SLOTS - 1);
    while (c->cache[i].sql != NULL)
        i = (i + 1) & (STMT_CACHE_SLOTS - 1);
    c->cache[i].sql = strdup(sql);
    if (c->cache[i].sql == NULL)
        return NULL;
    if (c->cache[i].tombstone)
        c->tombstones--;
    c->cache[i].hash = h;
    c->cache[i].id = ++c->next_id;
    snprintf(c->cache[i].name, sizeof c->cache[i].name, "qx_%u", c->cache[i].id);
    c->cache[i].prepared = 0;
    c->cache[i].tombstone = 0;
    c->cached++;
    return &c->cache[i];
}

static void cache_remove(qx_conn *c, stmt_entry *e)
{
    free(e->sql);
    e->sql = NULL;
    e->prepared = 0;
    e->tombstone = 1;
    c->tombstones++;
    c->cached--;
}

/* ---- I/O --------------------------------------------------------------------------------- */

/* Waits until the socket is readable (and writable, when want_write). */
static int wait_socket(qx_conn *c, int want_write, int timeout_ms)
{
    struct pollfd p;
    int r;
    p.fd = PQsocket(c->pg);
    p.events = POLLIN | (want_write ? POLLOUT : 0);
    p.revents = 0;
    do {
        r = poll(&p, 1, timeout_ms);
    } while (r < 0 && errno == EINTR);
    return r;
}

/* Pushes everything queued to the server, reading whatever it sends meanwhile so neither side's
 * buffer can fill up and stall the other. */
static int flush_all(qx_conn *c)
{
    for (;;) {
        int r = PQflush(c->pg);
        if (r == 0)
            return 0;
        if (r < 0)
            return -1;
        if (wait_socket(c, 1, -1) < 0)
            return -1;
        if (!PQconsumeInput(c->pg))
            return -1;
    }
}

/* The next result of the pipeline, waiting for the server as needed. */
static PGresult *next_result(qx_conn *c)
{
    while (PQisBusy(c->pg)) {
        if (wait_socket(c, 0, -1) < 0 || !PQconsumeInput(c->pg)) {
            c->broken = 1; /* the socket failed under us */
            return NULL;
        }
    }
    return PQgetResult(c->pg);
}

/* COPY has no place in this API (no way to hand data in or out), but a statement may still
 * start one. COPY TO STDOUT: the rows are read and dropped, and the statement counts as done.
 * COPY FROM STDIN: ended with an error, so the server fails the statement (in a pipelined batch
 * the caller gives the connection up instead: the messages already sent behind the COPY cannot
 * be taken back). Anything else (replication): the connection is given up. Returns the result
 * that follows the copy, NULL when the connection is lost. Without this, libpq keeps returning
 * the COPY state and the caller waits forever. */
static PGresult *finish_copy(qx_conn *c, ExecStatusType st)
{
    if (st == PGRES_COPY_OUT) {
        for (;;) {
            char *buf = NULL;
            int r = PQgetCopyData(c->pg, &buf, 1);
            if (r > 0) {
                PQfreemem(buf);
            } else if (r == 0) {
                if (wait_socket(c, 0, -1) < 0 || !PQconsumeInput(c->pg)) {
                    c->broken = 1;
                    return NULL;
                }
            } else {
                break; /* -1: the copy is over; -2: an error, which the next result carries */
            }
        }
    } else if (st == PGRES_COPY_IN) {
        if (PQputCopyEnd(c->pg, "COPY FROM STDIN is not supported by qx") < 0 ||
            flush_all(c) != 0) {
            c->broken = 1;
            return NULL;
        }
    } else {
        c->broken = 1;
        return NULL;
    }
    return next_result(c);
}

static int is_copy(ExecStatusType st)
{
    return st == PGRES_COPY_OUT || st == PGRES_COPY_IN || st == PGRES_COPY_BOTH;
}

/* ---- batches ----------------------------------------------------------------------------- */

typedef struct sent_item {
    stmt_entry *prepare; /* non-NULL: this item is the Parse of that entry */
    int stmt;            /* index of the statement it belongs to */
} sent_item;

/* Reads up to the Sync that ends the batch. A NULL result separates the results of two
 * statements; a NULL on a dead connection ends the wait. An error here belongs to no statement:
 * it is the commit of the implicit transaction that a batch without BEGIN runs in (a deferred
 * constraint, a serialization failure), so the batch failed although every statement succeeded. */
static qx_status drain_to_sync(qx_conn *c, qx_status status, qx_error *err)
{
    for (;;) {
        PGresult *res = next_result(c);
        if (res == NULL) {
            if (c->broken || PQstatus(c->pg) == CONNECTION_BAD) {
                c->broken = 1;
                return status;
            }
            continue;
        }
        if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            return status;
        }
        if (PQresultStatus(res) == PGRES_FATAL_ERROR && status == QX_OK)
            status = result_error(c, res, err);
        PQclear(res);
    }
}

static qx_status batch(qx_conn *c, qx_result **results, int *failed, const qx_stmt *stmts,
                       int n, int keep, qx_error *err)
{
    sent_item local_items[32]; /* a unit of work's batch fits; larger ones allocate */
    sent_item *items = NULL;
    int nitems = 0, i, k, copy_refused = 0;
    qx_status status = QX_OK;

    *failed = -1;
    for (i = 0; i < n; i++)
        results[i] = NULL;
    if (c == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "connection is closed");
    if (qx_conn_is_broken(c)) {
        c->broken = 1;
        return qx_error_set(err, QX_ERR_CONNECTION, "connection is broken");
    }
    if (n <= 0)
        return QX_OK;
    if (c->tombstones > 0 && c->cached + c->tombstones >= STMT_CACHE_MAX)
        cache_rehash(c);

    items = (size_t)n * 2 <= sizeof local_items / sizeof local_items[0]
                ? local_items
                : malloc(sizeof *items * (size_t)n * 2);
    if (items == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");

    if (!PQenterPipelineMode(c->pg) || PQsetnonblocking(c->pg, 1) != 0) {
        if (items != local_items)
            free(items);
        return conn_error(c, err);
    }

    for (i = 0; i < n; i++) {
        const qx_stmt *s = &stmts[i];
        unsigned int h = hash_sql(s->sql);
        stmt_entry *e = cache_find(c, s->sql, h);
        int ok;

        if (e == NULL) {
            e = cache_add(c, s->sql, h);
            if (e != NULL) {
                if (!PQsendPrepare(c->pg, e->name, s->sql, s->nparams, NULL)) {
                    cache_remove(c, e);
                    status = conn_error(c, err);
                    *failed = i;
                    break;
                }
                items[nitems].prepare = e;
                items[nitems].stmt = i;
                nitems++;
            }
        }
        if (e != NULL) {
            ok = PQsendQueryPrepared(c->pg, e->name, s->nparams, s->values, s->lengths, NULL, 0);
        } else {
            ok = PQsendQueryParams(c->pg, s->sql, s->nparams, NULL, s->values, s->lengths, NULL,
                                   0);
        }
        if (!ok) {
            status = conn_error(c, err);
            *failed = i;
            break;
        }
        items[nitems].prepare = NULL;
        items[nitems].stmt = i;
        nitems++;
    }

    if (!PQpipelineSync(c->pg) || flush_all(c) != 0) {
        if (status == QX_OK) {
            status = conn_error(c, err);
            *failed = -1;
        }
        c->broken = 1;
    }

    /* Collect one result (plus the NULL that ends it) per sent item, in order. */
    for (k = 0; k < nitems && !c->broken; k++) {
        PGresult *res = next_result(c);
        ExecStatusType st;
        sent_item *it = &items[k];

        if (res == NULL) {
            if (status == QX_OK) {
                status = conn_error(c, err);
                *failed = it->stmt;
            }
            c->broken = c->broken || PQstatus(c->pg) == CONNECTION_BAD;
            if (c->broken)
                break;
            continue;
        }
        st = PQresultStatus(res);
        if (st == PGRES_COPY_IN) {
            /* the server now reads the statements sent behind it as COPY data: no way back.
             * Dropping the connection aborts the transaction, so nothing of the batch is kept. */
            PQclear(res);
            if (status == QX_OK) {
                status = qx_error_set(err, QX_ERR_INVALID,
                                      "COPY FROM STDIN is not supported (the connection is closed)");
                *failed = it->stmt;
            }
            c->broken = 1;
            copy_refused = 1;
            break;
        }
        if (is_copy(st)) {
            PQclear(res);
            res = finish_copy(c, st);
            if (res == NULL) {
                if (status == QX_OK) {
                    status = conn_error(c, err);
                    *failed = it->stmt;
                }
                c->broken = 1;
                break;
            }
            st = PQresultStatus(res);
        }
        if (it->prepare != NULL) {
            if (st == PGRES_COMMAND_OK) {
                it->prepare->prepared = 1;
            } else {
                if (st != PGRES_PIPELINE_ABORTED && status == QX_OK) {
                    status = result_error(c, res, err);
                    *failed = it->stmt;
                }
                cache_remove(c, it->prepare);
                /* later items of the same text were created by this batch: drop the link */
                for (i = k + 1; i < nitems; i++)
                    if (items[i].prepare == it->prepare)
                        items[i].prepare = NULL;
            }
            PQclear(res);
        } else if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK || st == PGRES_EMPTY_QUERY) {
            /* an empty statement did nothing, and the server went on with the batch */
            results[it->stmt] = wrap_result(res);
            if (results[it->stmt] == NULL && status == QX_OK) {
                status = qx_error_set(err, QX_ERR_NOMEM, "out of memory");
                *failed = it->stmt;
            }
        } else {
            if (st != PGRES_PIPELINE_ABORTED && status == QX_OK) {
                status = result_error(c, res, err);
                *failed = it->stmt;
            }
            PQclear(res);
        }
        /* the NULL that closes this item's results */
        res = next_result(c);
        if (res != NULL) {
            /* not expected for prepared/param queries; keep the stream aligned */
            PQclear(res);
        }
    }
    if (!c->broken)
        status = drain_to_sync(c, status, err); /* *failed stays -1 for an error at the Sync */

    if (!c->broken) {
        PQsetnonblocking(c->pg, 0);
        if (!PQexitPipelineMode(c->pg) && status == QX_OK) {
            status = conn_error(c, err);
        }
    }
    if (PQstatus(c->pg) == CONNECTION_BAD)
        c->broken = 1;
    if (c->broken && status == QX_OK) {
        status = qx_error_set(err, QX_ERR_CONNECTION, "connection lost: %s",
                              PQerrorMessage(c->pg));
        if (err != NULL)
            trim_newline(err->message);
    }
    if (c->broken && status != QX_OK && status != QX_ERR_CONNECTION && !copy_refused) {
        /* a server error that also cost the connection is reported as a connection failure */
        if (err != NULL)
            err->status = QX_ERR_CONNECTION;
        status = QX_ERR_CONNECTION;
    }
    if (status != QX_OK && !keep) {
        for (i = 0; i < n; i++) {
            qx_result_free(results[i]);
            results[i] = NULL;
        }
    }
    if (items != local_items)
        free(items);
    return status;
}

qx_status qx_conn_batch(qx_conn *c, qx_result **results, int *failed, const qx_stmt *stmts,
                        int n, qx_error *err)
{
    return batch(c, results, failed, stmts, n, 0, err);
}

qx_status qx_conn_batch_keep(qx_conn *c, qx_result **results, int *failed, const qx_stmt *stmts,
                             int n, qx_error *err)
{
    return batch(c, results, failed, stmts, n, 1, err);
}

qx_status qx_conn_exec(qx_conn *c, qx_result **result, const char *sql, int nparams,
                       const char *const *values, const int *lengths, qx_error *err)
{
    qx_stmt s;
    int failed;
    s.sql = sql;
    s.nparams = nparams;
    s.values = values;
    s.lengths = lengths;
    return qx_conn_batch(c, result, &failed, &s, 1, err);
}

qx_status qx_conn_script(qx_conn *c, const char *sql, qx_error *err)
{
    PGresult *res;
    qx_status status = QX_OK;

    if (c == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "connection is closed");
    if (qx_conn_is_broken(c))
        return qx_error_set(err, QX_ERR_CONNECTION, "connection is broken");
    if (!PQsendQuery(c->pg, sql))
        return conn_error(c, err);
    while ((res = next_result(c)) != NULL) {
        ExecStatusType st = PQresultStatus(res);
        if (is_copy(st)) {
            ExecStatusType copy = st;
            PQclear(res);
            if ((res = finish_copy(c, st)) == NULL)
                break;
            st = PQresultStatus(res);
            if (copy == PGRES_COPY_IN && st == PGRES_FATAL_ERROR && status == QX_OK)
                status = qx_error_set(err, QX_ERR_INVALID, "COPY FROM STDIN is not supported");
        }
        if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_EMPTY_QUERY &&
            status == QX_OK)
            status = result_error(c, res, err);
        PQclear(res);
    }
    if (PQstatus(c->pg) == CONNECTION_BAD)
        c->broken = 1;
    if (c->broken && status == QX_OK)
        status = conn_error(c, err);
    return status;
}

/* ---- LISTEN / NOTIFY --------------------------------------------------------------------- */

qx_status qx_conn_listen(qx_conn *c, const char *channel, qx_error *err)
{
    char *ident, *sql;
    qx_status s;
    size_t len;

    if (c == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "connection is closed");
    ident = PQescapeIdentifier(c->pg, channel, strlen(channel));
    if (ident == NULL)
        return conn_error(c, err);
    len = strlen(ident) + 8;
    sql = malloc(len);
    if (sql == NULL) {
        PQfreemem(ident);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    snprintf(sql, len, "LISTEN %s", ident);
    PQfreemem(ident);
    s = qx_conn_script(c, sql, err);
    free(sql);
    if (s == QX_OK)
        c->listening = 1;
    return s;
}

qx_status qx_conn_unlisten(qx_conn *c, qx_error *err)
{
    PGnotify *n;
    qx_status s;
    if (c == NULL || !c->listening)
        return QX_OK;
    s = qx_conn_script(c, "UNLISTEN *", err);
    while ((n = PQnotifies(c->pg)) != NULL) /* read before UNLISTEN took effect */
        PQfreemem(n);
    if (s == QX_OK)
        c->listening = 0;
    return s;
}

static qx_status collect_notifies(qx_conn *c, qx_notify **out, int *count, qx_error *err)
{
    PGnotify *n;
    while ((n = PQnotifies(c->pg)) != NULL) {
        qx_notify *grown = realloc(*out, sizeof **out * (size_t)(*count + 1));
        if (grown == NULL) {
            PQfreemem(n);
            return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        }
        *out = grown;
        grown[*count].channel = strdup(n->relname);
        grown[*count].payload = strdup(n->extra != NULL ? n->extra : "");
        grown[*count].pid = n->be_pid;
        (*count)++;
        PQfreemem(n);
        if (grown[*count - 1].channel == NULL || grown[*count - 1].payload == NULL)
            return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    return QX_OK;
}

qx_status qx_conn_notifications(qx_conn *c, qx_notify **out, int *count, int timeout_ms,
                                qx_error *err)
{
    qx_status s;
    *out = NULL;
    *count = 0;
    if (c == NULL)
        return qx_error_set(err, QX_ERR_CLOSED, "connection is closed");
    if (qx_conn_is_broken(c))
        return qx_error_set(err, QX_ERR_CONNECTION, "connection is broken");
    if (!PQconsumeInput(c->pg))
        return conn_error(c, err);
    s = collect_notifies(c, out, count, err);
    if (s == QX_OK && *count == 0 && timeout_ms != 0) {
        int r = wait_socket(c, 0, timeout_ms < 0 ? -1 : timeout_ms);
        if (r < 0)
            return qx_error_set(err, QX_ERR_CONNECTION, "poll: %s", strerror(errno));
        if (r > 0) {
            if (!PQconsumeInput(c->pg))
                s = conn_error(c, err);
            else
                s = collect_notifies(c, out, count, err);
        }
    }
    if (s != QX_OK) {
        qx_notify_free(*out, *count);
        *out = NULL;
        *count = 0;
    }
    return s;
}

void qx_notify_free(qx_notify *n, int count)
{
    int i;
    if (n == NULL)
        return;
    for (i = 0; i < count; i++) {
        free(n[i].channel);
        free(n[i].payload);
    }
    free(n);
}

/* ---- health ------------------------------------------------------------------------------ */

int qx_conn_check(qx_conn *c)
{
    /* An idle connection has nothing to read; if the socket is readable the server said
     * something (a FATAL on termination, then EOF), so read it and see if we are still alive.
     * libpq takes the FATAL message as a notice (on_notice marks the connection broken) and
     * notices EOF only on a later read, so read while there is something to read (a few rounds:
     * a stream of NOTIFYs must not spin us). */
    int round;
    if (qx_conn_is_broken(c))
        return 0;
    if (PQtransactionStatus(c->pg) == PQTRANS_ACTIVE)
        return 0;
    for (round = 0; round < 8 && wait_socket(c, 0, 0) > 0; round++) {
        if (!PQconsumeInput(c->pg) || PQstatus(c->pg) != CONNECTION_OK) {
            c->broken = 1;
            return 0;
        }
        (void)PQisBusy(c->pg); /* parses what was read: a FATAL reaches on_notice */
        if (c->broken)
            return 0;
    }
    return 1;
}
