/* The transaction userdata: core.tx(conn[, timeout_ms]) and its methods (see qx_tx in qx.h).
 * Over a wire codec (core.tx(wire[, timeout_ms])) a call that needs a round trip returns
 * core.PENDING instead of its results; once the caller has moved the codec's bytes,
 * tx:resume() returns what the call would have returned. */
#include <limits.h>

#include <stdio.h>

#include "binding.h"

/* what tx:resume() pushes: the results of the call that returned core.PENDING */
enum { PEND_NONE, PEND_ROWS, PEND_SPARSE, PEND_COUNT, PEND_EXEC, PEND_STATUS, PEND_COMMIT };

typedef struct ltx {
    qx_tx *tx;       /* NULL once closed */
    void **conn;     /* the connection's (or wire's) userdata slot; NULL there once released */
    int pend;        /* PEND_*: a call waits for tx:resume() */
    int pend_max;    /* its row limit (rows_upto), -1 none */
    qx_result *held; /* a result being turned into Lua values: freed by close if that raises */
    int conn_ref;    /* LuaJIT: registry reference that keeps the connection userdata alive
                      * (Lua 5.4 keeps it as the user value) */
} ltx;

static const char TX_MT_KEY = 't';
static const char PENDING_KEY = 'p';

static int push_pending(lua_State *L, ltx *lt, int pend)
{
    lt->pend = pend;
    lua_pushlightuserdata(L, (void *)&PENDING_KEY);
    return 1;
}

/* The tx at index 1; methods carry the metatable as upvalue 1 (see qx_to_hot). */
static ltx *to_tx(lua_State *L)
{
    return qx_to_hot(L, QX_TX_MT);
}

static ltx *check_tx(lua_State *L)
{
    ltx *lt = to_tx(L);
    if (lt->tx == NULL)
        luaL_error(L, "transaction is closed");
    if (*lt->conn == NULL)
        luaL_error(L, "connection was released");
    return lt;
}

/* A finished transaction is misuse to call again; a failed one answers with its error. */
static ltx *check_open(lua_State *L)
{
    ltx *lt = check_tx(L);
    if (lt->pend != PEND_NONE)
        luaL_error(L, "transaction waits for its reply (tx:resume() first)");
    qx_tx_state s = qx_tx_state_of(lt->tx);
    if (s == QX_TXS_COMMITTED)
        luaL_error(L, "transaction is committed");
    if (s == QX_TXS_ROLLED_BACK)
        luaL_error(L, "transaction is rolled back");
    return lt;
}

/* core.tx(conn | wire[, timeout_ms]) -> tx */
static int l_new(lua_State *L)
{
    qx_wire **wslot = qx_test_wire_slot(L, 1);
    void **slot = wslot != NULL ? (void **)wslot : (void **)qx_check_conn_slot(L, 1);
    qx_tx_options o;
    qx_error err;
    ltx *lt;

    qx_tx_options_init(&o);
    if (!lua_isnoneornil(L, 2)) {
        long long v;
        if (!qx_isinteger(L, 2, &v) || v < 0 || v > INT_MAX)
            return luaL_argerror(L, 2, "timeout_ms must be a non-negative integer");
        o.timeout_ms = (int)v;
    }
    /* closed first, then made: an error in between leaks nothing */
#if LUA_VERSION_NUM >= 504
    lt = lua_newuserdatauv(L, sizeof *lt, 1);
#else
    lt = lua_newuserdata(L, sizeof *lt);
#endif
    lt->tx = NULL;
    lt->conn = slot;
    lt->pend = PEND_NONE;
    lt->pend_max = -1;
    lt->held = NULL;
    lt->conn_ref = LUA_NOREF;
    lua_pushlightuserdata(L, (void *)&TX_MT_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_setmetatable(L, -2);
    lt->conn_ref = qx_hold(L, 1);
    if (*slot == NULL)
        return luaL_argerror(L, 1, "connection is closed");
    if ((wslot != NULL ? qx_tx_new_wire(&lt->tx, *wslot, &o, &err)
                       : qx_tx_new(&lt->tx, (qx_conn *)*slot, &o, &err)) != QX_OK) {
        qx_unhold(L, -1, &lt->conn_ref);
        return luaL_error(L, "%s", err.message);
    }
    return 1;
}

/* What a call keeps on the C stack; more parameters take a userdata. */
#define LOCAL_PARAMS 32

typedef struct params {
    const char *lv[LOCAL_PARAMS];
    int ll[LOCAL_PARAMS];
    char lnum[LOCAL_PARAMS * QX_NUM_SCRATCH];
    const char **values;
    int *lengths;
} params;

/* The statement at sql_idx with its parameters after it, up to the top. Texts of tables (JSON)
 * are pushed and stay on the stack until the call returns. On a value that cannot be sent, fills
 * why and returns 0. */
static int make_stmt(lua_State *L, int sql_idx, params *p, qx_stmt *s, qx_error *why)
{
    int n = lua_gettop(L) - sql_idx, k;
    char *num = p->lnum, msg[256];

    if (lua_type(L, sql_idx) != LUA_TSTRING)
        luaL_argerror(L, sql_idx, "SQL text expected");
    s->sql = lua_tostring(L, sql_idx);
    if (n >= 65536)
        luaL_error(L, "too many parameters");
    p->values = p->lv;
    p->lengths = p->ll;
    if (n > LOCAL_PARAMS) {
        char *block = lua_newuserdata(L, (size_t)n * (sizeof *p->values + sizeof *p->lengths +
                                                      QX_NUM_SCRATCH));
        p->values = (const char **)(void *)block;
        p->lengths = (int *)(void *)(block + (size_t)n * sizeof *p->values);
        num = block + (size_t)n * (sizeof *p->values + sizeof *p->lengths);
    }
    luaL_checkstack(L, n + 4, "too many parameters");
    for (k = 0; k < n; k++) {
        int pushed;
        if (!qx_param_text(L, sql_idx + 1 + k, k + 1, &p->values[k], &p->lengths[k],
                           num + (size_t)k * QX_NUM_SCRATCH, &pushed, msg, sizeof msg)) {
            qx_error_set(why, QX_ERR_INVALID, "%s", msg);
            return 0;
        }
    }
    s->nparams = n;
    s->values = p->values;
    s->lengths = p->lengths;
    return 1;
}

/* tx:queue(sql, ...) -> true | nil, err */
static int l_queue(lua_State *L)
{
    ltx *lt = check_open(L);
    params p;
    qx_stmt s;
    qx_error err;
    if (!make_stmt(L, 2, &p, &s, &err)) {
        qx_tx_queue_failure(lt->tx, &err);
        return qx_push_error(L, &err);
    }
    if (qx_tx_queue(lt->tx, &s, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

/* tx:queue_id(sql, ...): as queue, for a statement whose first row is core.TX_ID_COLUMNS */
static int l_queue_id(lua_State *L)
{
    ltx *lt = check_open(L);
    params p;
    qx_stmt s;
    qx_error err;
    if (!make_stmt(L, 2, &p, &s, &err)) {
        qx_tx_queue_failure(lt->tx, &err);
        return qx_push_error(L, &err);
    }
    if (qx_tx_queue_id(lt->tx, &s, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

enum { AS_ROWS, AS_SPARSE, AS_COUNT };

static int push_read(lua_State *L, ltx *lt, qx_result *res, int as, int max_rows);

/* Sends the queue and the statement at sql_idx; pushes its rows (as) and the affected count. */
static int send_read(lua_State *L, ltx *lt, int sql_idx, int as, int max_rows)
{
    params p;
    qx_stmt s;
    qx_result *res = NULL;
    qx_error err;
    if (!make_stmt(L, sql_idx, &p, &s, &err)) {
        /* a statement that cannot be made fails the send that would carry it */
        qx_tx_queue_failure(lt->tx, &err);
        qx_tx_flush(lt->tx, &err);
        return qx_push_error(L, &err);
    }
    switch (qx_tx_query(lt->tx, &res, &s, &err)) {
    case QX_OK: break;
    case QX_PENDING:
        lt->pend_max = max_rows;
        return push_pending(L, lt, as == AS_ROWS ? PEND_ROWS : as == AS_SPARSE ? PEND_SPARSE
                                                                                : PEND_COUNT);
    default: return qx_push_error(L, &err);
    }
    return push_read(L, lt, res, as, max_rows);
}

/* A read's rows (as) and affected count; frees res. */
static int push_read(lua_State *L, ltx *lt, qx_result *res, int as, int max_rows)
{
    lt->held = res; /* freed by close should making the rows raise */
    if (as == AS_COUNT)
        lua_pushboolean(L, 1);
    else
        qx_push_rows(L, res, as == AS_SPARSE, max_rows, NULL);
    qx_pushint64(L, qx_result_affected(res));
    lt->held = NULL;
    qx_result_free(res);
    return 2;
}

/* tx:query(sql, ...) -> rows, affected | nil, err */
static int l_query(lua_State *L)
{
    return send_read(L, check_open(L), 2, AS_ROWS, -1);
}

/* tx:rows(sql, ...) -> rows without their NULL columns, affected | nil, err */
static int l_rows(lua_State *L)
{
    return send_read(L, check_open(L), 2, AS_SPARSE, -1);
}

/* tx:rows_upto(max, sql, ...) -> at most max rows (as tx:rows), the count of them all */
static int l_rows_upto(lua_State *L)
{
    ltx *lt = check_open(L);
    long long max;
    if (!qx_isinteger(L, 2, &max) || max < 0 || max > INT_MAX)
        return luaL_argerror(L, 2, "a row limit must be a non-negative integer");
    return send_read(L, lt, 3, AS_SPARSE, (int)max);
}

/* tx:exec(sql, ...) -> affected | nil, err */
static int l_exec(lua_State *L)
{
    ltx *lt = check_open(L);
    int n = send_read(L, lt, 2, AS_COUNT, -1);
    if (lt->pend != PEND_NONE) {
        lt->pend = PEND_EXEC;
        return n;
    }
    if (lua_isnil(L, -2))
        return n;
    return 1;
}

static int status_result(lua_State *L, qx_status s, const qx_error *err)
{
    if (s == QX_PENDING)
        return push_pending(L, to_tx(L), PEND_STATUS);
    if (s != QX_OK)
        return qx_push_error(L, err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_flush(lua_State *L)
{
    ltx *lt = check_open(L);
    qx_error err;
    return status_result(L, qx_tx_flush(lt->tx, &err), &err);
}

static int l_savepoint(lua_State *L)
{
    ltx *lt = check_open(L);
    qx_error err;
    return status_result(L, qx_tx_savepoint(lt->tx, &err), &err);
}

static int l_release(lua_State *L)
{
    ltx *lt = check_open(L);
    qx_error err;
    return status_result(L, qx_tx_release(lt->tx, &err), &err);
}

static int l_rollback_to(lua_State *L)
{
    ltx *lt = check_open(L);
    qx_error err;
    return status_result(L, qx_tx_rollback_to(lt->tx, &err), &err);
}

#define LOCAL_CHANNELS 8

static int push_commit(lua_State *L, ltx *lt, qx_status s, int wake_failed, qx_error *e);

/* tx:commit(channel, ...) -> true | true, wake_err | nil, err (a lost reply: code
 * "unknown_outcome", with xid and timeline when they were learned) */
static int l_commit(lua_State *L)
{
    ltx *lt = check_open(L);
    int n = lua_gettop(L) - 1, i, wake_failed = 0;
    const char *local[LOCAL_CHANNELS], **channels = local;
    qx_status s;
    qx_error err;
    if (n > LOCAL_CHANNELS)
        channels = lua_newuserdata(L, sizeof *channels * (size_t)n);
    for (i = 0; i < n; i++)
        channels[i] = luaL_checkstring(L, i + 2);
    s = qx_tx_commit(lt->tx, &wake_failed, channels, n, &err);
    if (s == QX_PENDING)
        return push_pending(L, lt, PEND_COMMIT);
    return push_commit(L, lt, s, wake_failed, &err);
}

static int push_commit(lua_State *L, ltx *lt, qx_status s, int wake_failed, qx_error *e)
{
    if (s != QX_OK) {
        qx_push_error(L, e);
        if (e->status == QX_ERR_UNKNOWN_OUTCOME) {
            /* what a fresh connection needs to ask what became of it ("": not learned) */
            const char *xid = qx_tx_xid(lt->tx), *timeline = qx_tx_timeline(lt->tx);
            if (xid[0] != '\0') {
                lua_pushstring(L, xid);
                lua_setfield(L, -2, "xid");
            }
            if (timeline[0] != '\0') {
                lua_pushstring(L, timeline);
                lua_setfield(L, -2, "timeline");
            }
        }
        return 2;
    }
    lua_pushboolean(L, 1);
    if (!wake_failed)
        return 1;
    qx_push_error(L, e); /* nil, err */
    lua_remove(L, -2);
    return 2;
}

/* tx:resume() -> what the call that returned core.PENDING returns */
static int l_resume(lua_State *L)
{
    ltx *lt = check_tx(L);
    int pend = lt->pend, wake_failed = 0, n;
    qx_result *res = NULL;
    qx_error err;
    qx_status s;
    if (pend == PEND_NONE)
        return luaL_error(L, "no call waits for its reply");
    s = qx_tx_resume(lt->tx, &res, &wake_failed, &err);
    if (qx_tx_pending(lt->tx))
        return luaL_error(L, "%s", err.message); /* its reply has not come yet */
    lt->pend = PEND_NONE;
    switch (pend) {
    case PEND_COMMIT: return push_commit(L, lt, s, wake_failed, &err);
    case PEND_STATUS: return status_result(L, s, &err);
    default: break;
    }
    if (s != QX_OK)
        return qx_push_error(L, &err);
    n = push_read(L, lt, res, pend == PEND_ROWS ? AS_ROWS : pend == PEND_SPARSE ? AS_SPARSE
                                                                                 : AS_COUNT,
                  lt->pend_max);
    return pend == PEND_EXEC ? 1 : n;
}

static int l_pending(lua_State *L)
{
    ltx *lt = to_tx(L);
    lua_pushboolean(L, lt->tx != NULL && lt->pend != PEND_NONE);
    return 1;
}

static int l_rollback(lua_State *L)
{
    ltx *lt = check_tx(L);
    if (lt->pend != PEND_NONE)
        return luaL_error(L, "transaction waits for its reply (tx:resume() first)");
    qx_error err;
    return status_result(L, qx_tx_rollback(lt->tx, &err), &err);
}

static int l_queued(lua_State *L)
{
    ltx *lt = check_tx(L);
    lua_pushinteger(L, qx_tx_queued(lt->tx));
    return 1;
}

static int l_status(lua_State *L)
{
    static const char *const names[] = { "active", "failed", "committed", "rolled back" };
    ltx *lt = to_tx(L);
    lua_pushstring(L, lt->tx == NULL ? "closed" : names[qx_tx_state_of(lt->tx)]);
    return 1;
}

/* tx:round_trips() -> n; tx:sent() -> the SQL texts of the last round trip (specs, traces) */
static int l_round_trips(lua_State *L)
{
    ltx *lt = check_tx(L);
    qx_pushint64(L, qx_tx_round_trips(lt->tx));
    return 1;
}

static int l_sent(lua_State *L)
{
    ltx *lt = check_tx(L);
    int n = qx_tx_last_sent(lt->tx, NULL, 0), i;
    const char **texts = lua_newuserdata(L, sizeof *texts * (size_t)(n > 0 ? n : 1));
    qx_tx_last_sent(lt->tx, texts, n);
    lua_createtable(L, n, 0);
    for (i = 0; i < n; i++) {
        lua_pushstring(L, texts[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* close, __gc and __close (see qx_type): frees the transaction, not the connection, which its
 * owner releases, rolling back what is open */
static void tx_close(lua_State *L, void *ud)
{
    ltx *lt = ud;
    if (lt->held != NULL) {
        qx_result_free(lt->held);
        lt->held = NULL;
    }
    if (lt->tx != NULL && *lt->conn == NULL)
        qx_tx_forget_connection(lt->tx); /* closed under it: nothing of it may be touched */
    qx_tx_free(lt->tx);
    lt->tx = NULL;
    qx_unhold(L, 1, &lt->conn_ref);
}

static void tx_describe(void *ud, char *buf, size_t size)
{
    static const char *const names[] = { "active", "failed", "committed", "rolled back" };
    snprintf(buf, size, "%s", names[qx_tx_state_of(((ltx *)ud)->tx)]);
}

static const luaL_Reg methods[] = {
    { "queue", l_queue },
    { "queue_id", l_queue_id },
    { "query", l_query },
    { "rows", l_rows },
    { "rows_upto", l_rows_upto },
    { "exec", l_exec },
    { "flush", l_flush },
    { "savepoint", l_savepoint },
    { "release", l_release },
    { "rollback_to", l_rollback_to },
    { "commit", l_commit },
    { "rollback", l_rollback },
    { "resume", l_resume },
    { "pending", l_pending },
    { "queued", l_queued },
    { "status", l_status },
    { "round_trips", l_round_trips },
    { "sent", l_sent },
    { NULL, NULL }
};

static const qx_type tx_type = {
    QX_TX_MT, methods, "close", tx_close, tx_describe, "closed", NULL
};

void qx_open_tx(lua_State *L)
{
    qx_register_hot_type(L, &tx_type, &TX_MT_KEY);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "tx");
    lua_pushstring(L, QX_TX_ID_COLUMNS);
    lua_setfield(L, -2, "TX_ID_COLUMNS");
    lua_pushstring(L, QX_XACT_STATUS_SQL);
    lua_setfield(L, -2, "XACT_STATUS_SQL");
    lua_pushstring(L, QX_WAKE_SQL_HEAD ", pg_notify($1, '')" QX_WAKE_SQL_TAIL);
    lua_setfield(L, -2, "WAKE_SQL");
    lua_pushlightuserdata(L, (void *)&PENDING_KEY);
    lua_setfield(L, -2, "PENDING");
}
