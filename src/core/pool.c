/*
 * Connection pool. Thread-safe (a mutex and a condition variable), because the same process may
 * run several Lua states on several threads; each Lua state normally owns its own pool.
 *
 * Idle connections are kept as a stack so the warmest one (with its prepared statements) is
 * reused first. Connections are opened lazily, up to size. On acquire, a connection that is
 * broken (the server went away, or it failed during use) or older than recycle_ms is closed and
 * replaced.
 *
 * A pool may also be shared by name (qx_pool_shared): every Lua state of the process that asks
 * for that name gets the same pool, counted, and the last to free it closes it. nginx's worker
 * threads run one Lua state per call in flight; sharing keeps their connections to the pool's
 * size however many states there are.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qx.h"

struct qx_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *conninfo;
    char *init_sql; /* NULL: none */
    int size, acquire_timeout_ms, recycle_ms, connect_timeout_ms;
    qx_conn **idle;
    int nidle;
    int open;   /* connections that exist, leased or idle, plus ones being opened */
    int in_use;
    int waiting;
    int closed;
    int free_when_returned;
    long long created, replaced;
    char *shared_name; /* NULL: not shared */
    int refs;          /* holders of a shared pool (under shared_mu) */
    qx_pool *shared_next;
};

/* the shared pools of the process, by name */
static pthread_mutex_t shared_mu = PTHREAD_MUTEX_INITIALIZER;
static qx_pool *shared_head;

void qx_pool_options_init(qx_pool_options *o)
{
    memset(o, 0, sizeof *o);
    o->size = 10;
    o->acquire_timeout_ms = 30000;
    o->recycle_ms = 3600 * 1000;
    o->connect_timeout_ms = 10000;
}

qx_status qx_pool_new(qx_pool **out, const qx_pool_options *o, qx_error *err)
{
    qx_pool *p;
    *out = NULL;
    if (o->conninfo == NULL || *o->conninfo == '\0')
        return qx_error_set(err, QX_ERR_INVALID, "no database url");
    if (o->size < 1)
        return qx_error_set(err, QX_ERR_INVALID, "pool size must be at least 1, got %d", o->size);
    if (o->acquire_timeout_ms < 0 || o->recycle_ms < 0 || o->connect_timeout_ms < 0)
        return qx_error_set(err, QX_ERR_INVALID, "pool timeouts must not be negative");
    p = calloc(1, sizeof *p);
    if (p == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    p->conninfo = strdup(o->conninfo);
    p->init_sql = o->init_sql != NULL && *o->init_sql != '\0' ? strdup(o->init_sql) : NULL;
    p->idle = calloc((size_t)o->size, sizeof *p->idle);
    if (p->conninfo == NULL || p->idle == NULL ||
        (p->init_sql == NULL && o->init_sql != NULL && *o->init_sql != '\0')) {
        free(p->conninfo);
        free(p->init_sql);
        free(p->idle);
        free(p);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    pthread_mutex_init(&p->mu, NULL);
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&p->cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    p->size = o->size;
    p->acquire_timeout_ms = o->acquire_timeout_ms;
    p->recycle_ms = o->recycle_ms;
    p->connect_timeout_ms = o->connect_timeout_ms;
    *out = p;
    return QX_OK;
}

static void pool_destroy(qx_pool *p)
{
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->conninfo);
    free(p->init_sql);
    free(p->idle);
    free(p->shared_name);
    free(p);
}

void qx_pool_close(qx_pool *p)
{
    qx_conn **idle;
    int n, i;
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->mu);
    p->closed = 1;
    idle = p->idle;
    n = p->nidle;
    p->nidle = 0;
    p->open -= n;
    /* closing happens outside the lock: PQfinish may take a moment */
    p->idle = calloc((size_t)p->size, sizeof *p->idle);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (i = 0; i < n; i++)
        qx_conn_close(idle[i]);
    free(idle);
}

qx_status qx_pool_shared(qx_pool **out, const char *name, const qx_pool_options *o,
                         qx_error *err)
{
    qx_pool *p;
    qx_status s;
    *out = NULL;
    if (name == NULL || *name == '\0')
        return qx_error_set(err, QX_ERR_INVALID, "a shared pool needs a name");
    pthread_mutex_lock(&shared_mu);
    for (p = shared_head; p != NULL; p = p->shared_next)
        if (strcmp(p->shared_name, name) == 0)
            break;
    if (p != NULL) {
        if (o->conninfo == NULL || strcmp(p->conninfo, o->conninfo) != 0 || p->size != o->size) {
            pthread_mutex_unlock(&shared_mu);
            return qx_error_set(err, QX_ERR_INVALID,
                                "shared pool '%s' exists with another url or size (%d)", name,
                                p->size);
        }
        p->refs++;
        pthread_mutex_unlock(&shared_mu);
        *out = p;
        return QX_OK;
    }
    s = qx_pool_new(&p, o, err);
    if (s == QX_OK) {
        p->shared_name = strdup(name);
        if (p->shared_name == NULL) {
            qx_pool_free(p);
            s = qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        } else {
            p->refs = 1;
            p->shared_next = shared_head;
            shared_head = p;
            *out = p;
        }
    }
    pthread_mutex_unlock(&shared_mu);
    return s;
}

/* Drops one holder of a shared pool; 1 when it was the last (the pool is then no longer
 * found by name). */
static int unshare(qx_pool *p)
{
    qx_pool **pp;
    int last;
    pthread_mutex_lock(&shared_mu);
    last = --p->refs == 0;
    if (last) {
        for (pp = &shared_head; *pp != NULL; pp = &(*pp)->shared_next) {
            if (*pp == p) {
                *pp = p->shared_next;
                break;
            }
        }
    }
    pthread_mutex_unlock(&shared_mu);
    return last;
}

void qx_pool_free(qx_pool *p)
{
    int destroy;
    if (p == NULL)
        return;
    if (p->shared_name != NULL && !unshare(p))
        return;
    qx_pool_close(p);
    pthread_mutex_lock(&p->mu);
    destroy = p->in_use == 0;
    if (!destroy)
        p->free_when_returned = 1;
    pthread_mutex_unlock(&p->mu);
    if (destroy)
        pool_destroy(p);
}

static int too_old(const qx_pool *p, qx_conn *c)
{
    return p->recycle_ms > 0 && (qx_clock() - qx_conn_created_at(c)) * 1000.0 > p->recycle_ms;
}

static void deadline_after(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

qx_status qx_pool_acquire(qx_pool *p, qx_conn **out, qx_error *err)
{
    struct timespec deadline;
    qx_status s;

    *out = NULL;
    deadline_after(&deadline, p->acquire_timeout_ms);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (p->closed) {
            pthread_mutex_unlock(&p->mu);
            return qx_error_set(err, QX_ERR_CLOSED, "pool is closed");
        }
        while (p->nidle > 0) {
            qx_conn *c = p->idle[--p->nidle];
            if (!qx_conn_check(c) || too_old(p, c)) {
                p->open--;
                p->replaced++;
                pthread_mutex_unlock(&p->mu);
                qx_conn_close(c);
                pthread_mutex_lock(&p->mu);
                continue;
            }
            p->in_use++;
            pthread_mutex_unlock(&p->mu);
            *out = c;
            return QX_OK;
        }
        if (p->open < p->size) {
            qx_conn *c = NULL;
            p->open++;
            p->in_use++;
            pthread_mutex_unlock(&p->mu);
            s = qx_conn_open(&c, p->conninfo, p->connect_timeout_ms, err);
            if (s == QX_OK && p->init_sql != NULL) {
                s = qx_conn_script(c, p->init_sql, err);
                if (s != QX_OK) {
                    qx_conn_close(c);
                    c = NULL;
                }
            }
            pthread_mutex_lock(&p->mu);
            if (s != QX_OK) {
                p->open--;
                p->in_use--;
                pthread_cond_signal(&p->cv);
                pthread_mutex_unlock(&p->mu);
                return s;
            }
            p->created++;
            pthread_mutex_unlock(&p->mu);
            *out = c;
            return QX_OK;
        }
        p->waiting++;
        s = QX_OK;
        while (!p->closed && p->nidle == 0 && p->open >= p->size) {
            if (pthread_cond_timedwait(&p->cv, &p->mu, &deadline) == ETIMEDOUT) {
                s = QX_ERR_TIMEOUT;
                break;
            }
        }
        p->waiting--;
        if (s == QX_ERR_TIMEOUT) {
            int size = p->size, in_use = p->in_use;
            pthread_mutex_unlock(&p->mu);
            return qx_error_set(err, QX_ERR_TIMEOUT,
                                "pool exhausted: %d of %d connections in use for %d ms", in_use,
                                size, p->acquire_timeout_ms);
        }
    }
}

void qx_pool_release(qx_pool *p, qx_conn *c)
{
    int keep, destroy = 0;
    if (c == NULL)
        return;
    /* Hand back only a clean connection: roll back what its user left open. */
    keep = !qx_conn_is_broken(c);
    if (keep && qx_conn_tx_status(c) != QX_TX_IDLE)
        keep = qx_conn_script(c, "ROLLBACK", NULL) == QX_OK && qx_conn_tx_status(c) == QX_TX_IDLE;
    /* and what it listened to: the next user would get notifications it never asked for, and
     * they would pile up in memory while the connection sits idle */
    if (keep)
        keep = qx_conn_unlisten(c, NULL) == QX_OK;

    pthread_mutex_lock(&p->mu);
    p->in_use--;
    if (keep && !p->closed && p->nidle < p->size) {
        p->idle[p->nidle++] = c;
        c = NULL;
    } else {
        p->open--;
    }
    if (p->free_when_returned && p->in_use == 0)
        destroy = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    qx_conn_close(c);
    if (destroy)
        pool_destroy(p);
}

void qx_pool_stats_get(qx_pool *p, qx_pool_stats *s)
{
    pthread_mutex_lock(&p->mu);
    s->size = p->size;
    s->open = p->open;
    s->idle = p->nidle;
    s->in_use = p->in_use;
    s->waiting = p->waiting;
    s->created = p->created;
    s->replaced = p->replaced;
    pthread_mutex_unlock(&p->mu);
}
