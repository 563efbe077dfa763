/* The leased-connection userdata: query, batch, script, listen, notifications, release. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

#include "binding.h"

typedef struct lconn {
    qx_conn *c;   /* NULL once released */
    qx_pool *p;
    int pool_ref; /* LuaJIT: registry reference that keeps the pool userdata alive (Lua 5.4
                   * keeps it as the userdata's user value) */
} lconn;

/* Its address keys the connection metatable in the registry: a lease finds it without
 * interning the type name. */
static const char CONN_MT_KEY = 'c';

void qx_conn_push(lua_State *L, qx_conn *c, qx_pool *p, int pool_idx)
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
    lc->pool_ref = LUA_NOREF;
    lua_pushlightuserdata(L, (void *)&CONN_MT_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, pool_idx);
#if LUA_VERSION_NUM >= 504
    lua_setiuservalue(L, -2, 1);
#else
    lc->pool_ref = luaL_ref(L, LUA_REGISTRYINDEX);
#endif
    lc->c = c;
}

/* The connection at index 1. The methods carry the metatable as upvalue 1, so the usual case
 * is one comparison; __gc and __close have no upvalue and take the named check. */
static lconn *to_conn(lua_State *L)
{
    lconn *lc = lua_touserdata(L, 1);
    if (lc != NULL && lua_getmetatable(L, 1)) {
        int same = lua_rawequal(L, -1, lua_upvalueindex(1));
        lua_pop(L, 1);
        if (same)
            return lc;
    }
    return luaL_checkudata(L, 1, QX_CONN_MT);
}

static lconn *check_conn(lua_State *L)
{
    lconn *lc = to_conn(L);
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
    qx_push_rows(L, res, 0, -1);
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
        qx_push_rows(L, results[i], 0, -1);
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

/* What conn:send keeps on the C stack; more statements or parameters take a userdata. */
#define LOCAL_STMTS 16
#define LOCAL_PARAMS 64

static const char *const SEND_MODES[] = { "rows", "sparse", "count", NULL };

/* conn:send(stmts, from, to[, mode, sql, ...])
 *   -> rows, affected | true, affected | true | nil, err, failed_index
 * Sends stmts[from..to] (statement tables as for batch) and then, when mode is given, sql with
 * the parameters that follow it, all in one pipelined round trip. The results of stmts are not
 * made into Lua values. mode says what comes back for sql: "rows" (as conn:query), "sparse"
 * (rows without their NULL columns), a number N (sparse, but only the first N rows are made into
 * tables; affected still counts every row the statement returned: a page asks for one row more
 * than it shows, to know whether another page follows, and need not build it) or "count" (true
 * and the affected count only). Without a final statement it returns true. failed_index is the
 * index in stmts of the statement that failed, to + 1 for sql, nil when the failure is not tied
 * to one. Nothing to send: true, and no round trip. It exists so that a unit of work sends its
 * queue and a read without building a batch table, a statement table for the read or result
 * tables for the statements it queued. */
static int l_send(lua_State *L)
{
    lconn *lc = check_conn(L);
    int top = lua_gettop(L);
    int from = (int)luaL_checkinteger(L, 3), to = (int)luaL_checkinteger(L, 4);
    int nq = to >= from ? to - from + 1 : 0, mode = -1, nfinal = 0, n, np_total = 0, i, k, p;
    int failed = -1, max_rows = -1;
    qx_stmt local_stmts[LOCAL_STMTS], *stmts = local_stmts;
    qx_result *local_results[LOCAL_STMTS], **results = local_results;
    const char *local_values[LOCAL_PARAMS], **values = local_values;
    int local_lengths[LOCAL_PARAMS], *lengths = local_lengths;
    char local_num[LOCAL_PARAMS * QX_NUM_SCRATCH], *num = local_num;
    char msg[256];
    qx_error err;

    if (nq > 0)
        luaL_checktype(L, 2, LUA_TTABLE);
    if (lua_type(L, 5) == LUA_TNUMBER) { /* sparse rows, at most this many made into tables */
        long long cap;
        if (!qx_isinteger(L, 5, &cap) || cap < 0 || cap > INT_MAX)
            return luaL_argerror(L, 5, "a row limit must be a non-negative integer");
        mode = 1;
        max_rows = (int)cap;
        luaL_checktype(L, 6, LUA_TSTRING);
        nfinal = top - 6;
    } else if (!lua_isnoneornil(L, 5)) {
        mode = luaL_checkoption(L, 5, NULL, SEND_MODES);
        luaL_checktype(L, 6, LUA_TSTRING);
        nfinal = top - 6;
    }
    n = nq + (mode >= 0);
    if (n == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (n > LOCAL_STMTS) {
        char *block = lua_newuserdata(L, (size_t)n * (sizeof *stmts + sizeof *results));
        stmts = (qx_stmt *)(void *)block;
        results = (qx_result **)(void *)(block + (size_t)n * sizeof *stmts);
    }
    /* the statements: their SQL stays alive in the statement tables, which stmts holds */
    for (i = 0; i < nq; i++) {
        long long v;
        int np;
        lua_rawgeti(L, 2, from + i);
        if (!lua_istable(L, -1))
            return luaL_error(L, "statement %d is not a table", from + i);
        lua_rawgeti(L, -1, 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "statement %d has no SQL text", from + i);
        stmts[i].sql = lua_tostring(L, -1);
        lua_getfield(L, -2, "n");
        if (lua_isnil(L, -1))
            np = (int)qx_rawlen(L, -3) - 1;
        else if (qx_isinteger(L, -1, &v) && v >= 0 && v < 65536)
            np = (int)v;
        else
            return luaL_error(L, "statement %d: n must be a parameter count", from + i);
        lua_pop(L, 3);
        stmts[i].nparams = np;
        np_total += np;
    }
    if (mode >= 0) {
        if (nfinal >= 65536)
            return luaL_error(L, "too many parameters");
        stmts[nq].sql = lua_tostring(L, 6);
        stmts[nq].nparams = nfinal;
        np_total += nfinal;
    }
    if (np_total > LOCAL_PARAMS) {
        char *block = lua_newuserdata(L, (size_t)np_total * (sizeof *values + sizeof *lengths +
                                                              QX_NUM_SCRATCH));
        values = (const char **)(void *)block;
        lengths = (int *)(void *)(block + (size_t)np_total * sizeof *values);
        num = block + (size_t)np_total * (sizeof *values + sizeof *lengths);
    }
    /* the parameters as text; JSON texts stay on the stack until the batch is done */
    for (i = 0, p = 0; i < n; i++) {
        int np = stmts[i].nparams, t = 0;
        stmts[i].values = values + p;
        stmts[i].lengths = lengths + p;
        if (np == 0)
            continue;
        if (i < nq) {
            luaL_checkstack(L, 4, "too many statements");
            lua_rawgeti(L, 2, from + i);
            t = lua_gettop(L);
        }
        for (k = 0; k < np; k++, p++) {
            int pushed, idx;
            if (i < nq) {
                lua_rawgeti(L, t, k + 2); /* anchored by the statement table */
                idx = lua_gettop(L);
            } else {
                idx = 7 + k;
            }
            if (!qx_param_text(L, idx, k + 1, &values[p], &lengths[p],
                               num + (size_t)p * QX_NUM_SCRATCH, &pushed, msg, sizeof msg)) {
                qx_push_error_msg(L, "invalid", msg);
                lua_pushinteger(L, i < nq ? from + i : to + 1);
                return 3;
            }
            if (i < nq) {
                if (pushed)
                    lua_remove(L, idx); /* keep the JSON text, drop the value */
                else
                    lua_pop(L, 1);
            }
        }
        if (i < nq)
            lua_remove(L, t);
    }
    if (qx_conn_batch(lc->c, results, &failed, stmts, n, &err) != QX_OK) {
        qx_push_error(L, &err);
        if (failed >= 0)
            lua_pushinteger(L, failed < nq ? from + failed : to + 1);
        else
            lua_pushnil(L);
        return 3;
    }
    for (i = 0; i < nq; i++)
        qx_result_free(results[i]);
    if (mode < 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (mode == 2)
        lua_pushboolean(L, 1);
    else
        qx_push_rows(L, results[nq], mode == 1, max_rows);
    qx_pushint64(L, qx_result_affected(results[nq]));
    qx_result_free(results[nq]);
    return 2;
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

/* release, __gc and __close: hand the connection back (see qx_type) */
static void conn_release(lua_State *L, void *ud)
{
    lconn *lc = ud;
    qx_conn *c = lc->c;
    lc->c = NULL;
    qx_pool_release(lc->p, c);
#if LUA_VERSION_NUM >= 504
    lua_pushnil(L);
    lua_setiuservalue(L, 1, 1);
#endif
    if (lc->pool_ref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, lc->pool_ref);
        lc->pool_ref = LUA_NOREF;
    }
}

static void conn_describe(void *ud, char *buf, size_t size)
{
    snprintf(buf, size, "pid %d", qx_conn_pid(((lconn *)ud)->c));
}

static const luaL_Reg methods[] = {
    { "query", l_query },
    { "batch", l_batch },
    { "send", l_send },
    { "script", l_script },
    { "listen", l_listen },
    { "notifications", l_notifications },
    { "status", l_status },
    { "pid", l_pid },
    { NULL, NULL }
};

static const qx_type conn_type = {
    QX_CONN_MT, methods, "release", conn_release, conn_describe, "released", NULL
};

int qx_open_conn(lua_State *L)
{
    const luaL_Reg *m;
    qx_register_type(L, &conn_type);
    luaL_getmetatable(L, QX_CONN_MT);
    /* the methods again, as closures over the metatable (see to_conn) */
    lua_getfield(L, -1, "__index");
    for (m = methods; m->name != NULL; m++) {
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, m->func, 1);
        lua_setfield(L, -2, m->name);
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, (void *)&CONN_MT_KEY);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    return 0;
}
