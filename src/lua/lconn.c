/* The leased-connection userdata: query, rows, batch, script, listen, notifications, release. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "binding.h"

typedef struct lconn {
    qx_conn *c;   /* NULL once released (or not yet leased) */
    qx_pool *p;
    qx_result *held;       /* a result being turned into Lua values, and a batch's: freed on */
    qx_result **held_list; /* release should that raise (out of memory) */
    int nheld;
    int pool_ref; /* LuaJIT: registry reference that keeps the pool userdata alive (Lua 5.4
                   * keeps it as the userdata's user value) */
} lconn;

/* Its address keys the connection metatable in the registry: a lease finds it without
 * interning the type name. */
static const char CONN_MT_KEY = 'c';

qx_conn **qx_conn_push(lua_State *L, qx_pool *p, int pool_idx)
{
    lconn *lc;
    if (pool_idx < 0 && pool_idx > LUA_REGISTRYINDEX)
        pool_idx = lua_gettop(L) + pool_idx + 1;
#if LUA_VERSION_NUM >= 504
    lc = lua_newuserdatauv(L, sizeof *lc, 1);
#else
    lc = lua_newuserdata(L, sizeof *lc);
#endif
    lc->c = NULL;
    lc->p = p;
    lc->held = NULL;
    lc->held_list = NULL;
    lc->nheld = 0;
    lc->pool_ref = LUA_NOREF;
    lua_pushlightuserdata(L, (void *)&CONN_MT_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_setmetatable(L, -2);
    lc->pool_ref = qx_hold(L, pool_idx);
    return &lc->c;
}

/* After a failed lease: drops the userdata's hold on the pool at once (on LuaJIT a registry
 * reference, which __gc would not drop for a connection never leased). */
void qx_conn_unpush(lua_State *L, int idx)
{
    lconn *lc = lua_touserdata(L, idx);
    qx_unhold(L, idx, &lc->pool_ref);
}

/* The connection at index 1. The methods carry the metatable as upvalue 1, so the usual case
 * is one comparison; __gc and __close have no upvalue and take the named check. */
static lconn *to_conn(lua_State *L)
{
    return qx_to_hot(L, QX_CONN_MT);
}

static lconn *check_conn(lua_State *L)
{
    lconn *lc = to_conn(L);
    if (lc->c == NULL)
        luaL_error(L, "connection was released");
    return lc;
}

qx_conn **qx_check_conn_slot(lua_State *L, int idx)
{
    lconn *lc = luaL_checkudata(L, idx, QX_CONN_MT);
    if (lc->c == NULL)
        luaL_error(L, "connection was released");
    return &lc->c;
}

static void free_held(lconn *lc)
{
    int i;
    if (lc->held != NULL) {
        qx_result_free(lc->held);
        lc->held = NULL;
    }
    if (lc->held_list != NULL) {
        for (i = 0; i < lc->nheld; i++)
            qx_result_free(lc->held_list[i]);
        free(lc->held_list);
        lc->held_list = NULL;
        lc->nheld = 0;
    }
}

/* Runs the statement at sql_idx with the parameters after it; pushes its rows and the affected
 * count. skip_nulls and max_rows as for qx_push_rows. */
static int run_read(lua_State *L, lconn *lc, int sql_idx, int skip_nulls, int max_rows)
{
    const char *sql = luaL_checkstring(L, sql_idx);
    int n = lua_gettop(L) - sql_idx;
    qx_params params;
    qx_result *res = NULL;
    qx_error err;

    if (!qx_params_from_stack(L, &params, sql_idx + 1, n))
        return 2;
    if (qx_conn_exec(lc->c, &res, sql, n, params.values, params.lengths, &err) != QX_OK)
        return qx_push_error(L, &err);
    lc->held = res; /* freed on release should making the rows raise */
    qx_push_rows(L, res, skip_nulls, max_rows, NULL);
    qx_pushint64(L, qx_result_affected(res));
    lc->held = NULL;
    qx_result_free(res);
    return 2;
}

/* conn:query(sql, ...) -> rows, affected | nil, err */
static int l_query(lua_State *L)
{
    return run_read(L, check_conn(L), 2, 0, -1);
}

/* conn:rows(sql, ...) -> rows without their NULL columns (nil, not core.null), affected */
static int l_rows(lua_State *L)
{
    return run_read(L, check_conn(L), 2, 1, -1);
}

/* conn:rows_upto(max, sql, ...) -> at most max rows (as conn:rows), the count of them all: a
 * page reads one row more than it shows, to know whether another follows, and need not make it */
static int l_rows_upto(lua_State *L)
{
    lconn *lc = check_conn(L);
    long long max;
    if (!qx_isinteger(L, 2, &max) || max < 0 || max > INT_MAX)
        return luaL_argerror(L, 2, "a row limit must be a non-negative integer");
    return run_read(L, lc, 3, 1, (int)max);
}

/* conn:batch({ { sql, n = k, p1, ..., pk }, ... }[, first]) -> results | nil, err, failed_index
 * Rows are made for the results from index first (default 1) on; earlier ones are true. A
 * statement with open_sealed (see qx_sealed_opener_init) has its sealed values opened as its
 * rows are made, and its result says which were left (field sealed). */
static int l_batch(lua_State *L)
{
    lconn *lc = check_conn(L);
    int n, failed = -1, first;
    qx_stmt *stmts;
    qx_result **results;
    qx_error err;
    qx_status s;

    luaL_checktype(L, 2, LUA_TTABLE);
    first = (int)luaL_optinteger(L, 3, 1);
    n = (int)qx_rawlen(L, 2);
    if (n == 0) {
        lua_newtable(L);
        return 1;
    }
    stmts = lua_newuserdata(L, sizeof *stmts * (size_t)n);
    free_held(lc);
    if (!qx_batch_stmts(L, 2, n, stmts))
        return 3;
    results = calloc((size_t)n, sizeof *results);
    if (results == NULL)
        return luaL_error(L, "out of memory");
    lc->held_list = results; /* freed on release should making the rows raise */
    lc->nheld = n;
    s = qx_conn_batch(lc->c, results, &failed, stmts, n, &err);
    if (s != QX_OK) {
        free_held(lc);
        qx_push_error(L, &err);
        if (failed >= 0)
            lua_pushinteger(L, failed + 1);
        else
            lua_pushnil(L);
        return 3;
    }
    qx_push_batch_results(L, results, n, first, 2);
    free_held(lc);
    return 1;
}

static int l_script(lua_State *L)
{
    lconn *lc = check_conn(L);
    qx_error err;
    if (qx_conn_script(lc->c, luaL_checkstring(L, 2), &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_listen(lua_State *L)
{
    lconn *lc = check_conn(L);
    qx_error err;
    if (qx_conn_listen(lc->c, luaL_checkstring(L, 2), &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_notifications(lua_State *L)
{
    lconn *lc = check_conn(L);
    int timeout = (int)luaL_optinteger(L, 2, 0), count = 0, i;
    qx_notify *ns = NULL;
    qx_error err;
    if (qx_conn_notifications(lc->c, &ns, &count, timeout, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_createtable(L, count, 0);
    for (i = 0; i < count; i++) {
        lua_createtable(L, 0, 3);
        lua_pushstring(L, ns[i].channel), lua_setfield(L, -2, "channel");
        lua_pushstring(L, ns[i].payload), lua_setfield(L, -2, "payload");
        lua_pushinteger(L, ns[i].pid), lua_setfield(L, -2, "pid");
        lua_rawseti(L, -2, i + 1);
    }
    qx_notify_free(ns, count);
    return 1;
}

static int l_status(lua_State *L)
{
    lconn *lc = check_conn(L);
    lua_pushstring(L, qx_tx_status_name(qx_conn_tx_status(lc->c)));
    return 1;
}

static int l_pid(lua_State *L)
{
    lconn *lc = check_conn(L);
    lua_pushinteger(L, qx_conn_pid(lc->c));
    return 1;
}

/* conn:xact_status(xid[, timeline]) -> "committed" | "aborted" | "in progress" | "unknown"
 * | nil, err */
static int l_xact_status(lua_State *L)
{
    lconn *lc = check_conn(L);
    const char *xid = luaL_checkstring(L, 2);
    const char *timeline = luaL_optstring(L, 3, NULL);
    qx_xact x;
    qx_error err;
    if (qx_xact_status(&x, lc->c, xid, timeline, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushstring(L, qx_xact_name(x));
    return 1;
}

/* release, __gc and __close: hand the connection back (see qx_type) */
static void conn_release(lua_State *L, void *ud)
{
    lconn *lc = ud;
    qx_conn *c = lc->c;
    free_held(lc);
    lc->c = NULL;
    qx_pool_release(lc->p, c);
    qx_unhold(L, 1, &lc->pool_ref);
}

static void conn_describe(void *ud, char *buf, size_t size)
{
    snprintf(buf, size, "pid %d", qx_conn_pid(((lconn *)ud)->c));
}

static const luaL_Reg methods[] = {
    { "query", l_query },
    { "batch", l_batch },
    { "rows", l_rows },
    { "rows_upto", l_rows_upto },
    { "script", l_script },
    { "listen", l_listen },
    { "notifications", l_notifications },
    { "status", l_status },
    { "pid", l_pid },
    { "xact_status", l_xact_status },
    { NULL, NULL }
};

static const qx_type conn_type = {
    QX_CONN_MT, methods, "release", conn_release, conn_describe, "released", NULL
};

int qx_open_conn(lua_State *L)
{
    qx_register_hot_type(L, &conn_type, &CONN_MT_KEY);
    return 0;
}
