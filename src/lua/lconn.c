/* The leased-connection userdata: query, batch, script, listen, notifications, release. */
#include <stdlib.h>

#include "binding.h"

typedef struct lconn {
    qx_conn *c;   /* NULL once released */
    qx_pool *p;
    int pool_ref; /* registry reference that keeps the pool userdata alive */
} lconn;

void qx_conn_push(lua_State *L, qx_conn *c, qx_pool *p, int pool_idx)
{
    lconn *lc = lua_newuserdata(L, sizeof *lc);
    lc->c = NULL;
    lc->p = p;
    lc->pool_ref = LUA_NOREF;
    qx_setmetatable(L, QX_CONN_MT);
    lua_pushvalue(L, pool_idx);
    lc->pool_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lc->c = c;
}

static lconn *check_conn(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, QX_CONN_MT);
    if (lc->c == NULL)
        luaL_error(L, "connection was released");
    return lc;
}

/* conn:query(sql, ...) -> rows, affected | nil, err */
static int l_query(lua_State *L)
{
    lconn *lc = check_conn(L);
    const char *sql = luaL_checkstring(L, 2);
    int n = lua_gettop(L) - 2;
    qx_params params;
    qx_result *res = NULL;
    qx_error err;

    if (!qx_params_from_stack(L, &params, 3, n))
        return 2;
    if (qx_conn_exec(lc->c, &res, sql, n, params.values, params.lengths, &err) != QX_OK)
        return qx_push_error(L, &err);
    qx_push_rows(L, res);
    qx_pushint64(L, qx_result_affected(res));
    qx_result_free(res);
    return 2;
}

/* conn:batch({ { sql, n = k, p1, ..., pk }, ... }[, first]) -> results | nil, err, failed_index
 * Rows are made for the results from index first (default 1) on; earlier ones are true. */
static int l_batch(lua_State *L)
{
    lconn *lc = check_conn(L);
    int n, i, base, failed = -1, first;
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
    results = lua_newuserdata(L, sizeof *results * (size_t)n);
    base = lua_gettop(L);
    for (i = 0; i < n; i++) {
        int k, np, t;
        long long v;
        qx_params params;

        lua_rawgeti(L, 2, i + 1);
        t = lua_gettop(L);
        if (!lua_istable(L, t))
            return luaL_error(L, "batch statement %d is not a table", i + 1);
        lua_rawgeti(L, t, 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "batch statement %d has no SQL text", i + 1);
        stmts[i].sql = lua_tostring(L, -1); /* anchored by the statement table */
        lua_pop(L, 1);
        lua_getfield(L, t, "n");
        if (lua_isnil(L, -1))
            np = (int)qx_rawlen(L, t) - 1;
        else if (qx_isinteger(L, -1, &v) && v >= 0 && v < 65536)
            np = (int)v;
        else
            return luaL_error(L, "batch statement %d: n must be a parameter count", i + 1);
        lua_pop(L, 1);
        luaL_checkstack(L, np + 4, "too many parameters");
        for (k = 0; k < np; k++)
            lua_rawgeti(L, t, k + 2);
        if (!qx_params_from_stack(L, &params, t + 1, np)) {
            lua_pushinteger(L, i + 1);
            return 3;
        }
        /* keep the anchor, drop the statement table and the copied values */
        lua_replace(L, t);
        lua_settop(L, t);
        stmts[i].nparams = np;
        stmts[i].values = params.values;
        stmts[i].lengths = params.lengths;
    }
    s = qx_conn_batch(lc->c, results, &failed, stmts, n, &err);
    if (s != QX_OK) {
        qx_push_error(L, &err);
        if (failed >= 0)
            lua_pushinteger(L, failed + 1);
        else
            lua_pushnil(L);
        return 3;
    }
    lua_createtable(L, n, 0);
    for (i = 0; i < n; i++) {
        if (i + 1 < first) {
            lua_pushboolean(L, 1);
            lua_rawseti(L, -2, i + 1);
            qx_result_free(results[i]);
            results[i] = NULL;
            continue;
        }
        lua_createtable(L, 0, 2);
        qx_push_rows(L, results[i]);
        lua_setfield(L, -2, "rows");
        qx_pushint64(L, qx_result_affected(results[i]));
        lua_setfield(L, -2, "affected");
        lua_rawseti(L, -2, i + 1);
        qx_result_free(results[i]);
        results[i] = NULL;
    }
    (void)base;
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
    static const char *const names[] = { "idle", "active", "intrans", "inerror", "unknown",
                                         "bad" };
    lconn *lc = check_conn(L);
    lua_pushstring(L, names[qx_conn_tx_status(lc->c)]);
    return 1;
}

static int l_pid(lua_State *L)
{
    lconn *lc = check_conn(L);
    lua_pushinteger(L, qx_conn_pid(lc->c));
    return 1;
}

/* release, __gc and __close: hand the connection back; twice is harmless */
static int l_release(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, QX_CONN_MT);
    if (lc->c != NULL) {
        qx_conn *c = lc->c;
        lc->c = NULL;
        qx_pool_release(lc->p, c);
    }
    if (lc->pool_ref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, lc->pool_ref);
        lc->pool_ref = LUA_NOREF;
    }
    return 0;
}

static int l_tostring(lua_State *L)
{
    lconn *lc = luaL_checkudata(L, 1, QX_CONN_MT);
    if (lc->c == NULL)
        lua_pushfstring(L, "qx.conn (released, %p)", (void *)lc);
    else
        lua_pushfstring(L, "qx.conn (pid %d, %p)", qx_conn_pid(lc->c), (void *)lc);
    return 1;
}

static const luaL_Reg methods[] = {
    { "query", l_query },
    { "batch", l_batch },
    { "script", l_script },
    { "listen", l_listen },
    { "notifications", l_notifications },
    { "status", l_status },
    { "pid", l_pid },
    { "release", l_release },
    { NULL, NULL }
};

int qx_open_conn(lua_State *L)
{
    qx_register_type(L, QX_CONN_MT, methods, l_release, l_tostring);
    return 0;
}
