/* The wire codec userdata (core.wire): PostgreSQL's protocol as strings in and out, for code
 * that owns the socket (an nginx cosocket). */
#include <stdio.h>
#include <stdlib.h>

#include "binding.h"

typedef struct lwire {
    qx_wire *w;           /* NULL once closed */
    qx_result **results;  /* the batch's, until batch_end has made them into Lua */
    int n;
    int keep;
    int list_ref;         /* the batch's statement list (open_sealed), LUA_NOREF when none */
} lwire;

static void free_results(lwire *lw)
{
    int i;
    if (lw->results == NULL)
        return;
    for (i = 0; i < lw->n; i++)
        qx_result_free(lw->results[i]);
    free(lw->results);
    lw->results = NULL;
    lw->n = 0;
}

static void wire_close(lua_State *L, void *ud)
{
    lwire *lw = ud;
    qx_wire_free(lw->w); /* frees what a batch not ended made, through lw->results */
    lw->w = NULL;
    free_results(lw);
    if (lw->list_ref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, lw->list_ref);
        lw->list_ref = LUA_NOREF;
    }
}

static void wire_describe(void *ud, char *buf, size_t size)
{
    lwire *lw = ud;
    snprintf(buf, size, "%s:%d, pid %d", qx_wire_host(lw->w), qx_wire_port(lw->w),
             qx_wire_pid(lw->w));
}

static int l_host(lua_State *L);
static int l_port(lua_State *L);
static int l_start(lua_State *L);
static int l_output(lua_State *L);
static int l_feed(lua_State *L);
static int l_lost(lua_State *L);
static int l_broken(lua_State *L);
static int l_ready(lua_State *L);
static int l_busy(lua_State *L);
static int l_tx_status(lua_State *L);
static int l_pid(lua_State *L);
static int l_auth(lua_State *L);
static int l_parameter(lua_State *L);
static int l_batch(lua_State *L);
static int l_batch_end(lua_State *L);

static const luaL_Reg methods[] = {
    { "host", l_host },
    { "port", l_port },
    { "start", l_start },
    { "output", l_output },
    { "feed", l_feed },
    { "lost", l_lost },
    { "broken", l_broken },
    { "ready", l_ready },
    { "busy", l_busy },
    { "tx_status", l_tx_status },
    { "pid", l_pid },
    { "auth", l_auth },
    { "parameter", l_parameter },
    { "batch", l_batch },
    { "batch_end", l_batch_end },
    { NULL, NULL }
};

static const qx_type wire_type = {
    QX_WIRE_MT, methods, "close", wire_close, wire_describe, "closed", NULL
};

static lwire *check(lua_State *L)
{
    return qx_check_open(L, 1, &wire_type, "wire codec is closed");
}

qx_wire *qx_check_wire(lua_State *L, int idx)
{
    return ((lwire *)qx_check_open(L, idx, &wire_type, "wire codec is closed"))->w;
}

qx_wire *qx_test_wire(lua_State *L, int idx)
{
    lwire *lw = qx_testudata(L, idx, QX_WIRE_MT);
    return lw != NULL ? lw->w : NULL;
}

qx_wire **qx_test_wire_slot(lua_State *L, int idx)
{
    lwire *lw = qx_testudata(L, idx, QX_WIRE_MT);
    return lw != NULL ? &lw->w : NULL;
}

/* core.wire(conninfo) -> wire | nil, err (a connection string libpq does not take, sslmode
 * require or stronger); nothing is sent */
static int l_new(lua_State *L)
{
    const char *conninfo;
    lwire *lw;
    luaL_checktype(L, 1, LUA_TSTRING);
    conninfo = lua_tostring(L, 1);
    lw = qx_new_closed(L, &wire_type, sizeof *lw);
    qx_error err;
    lw->list_ref = LUA_NOREF;
    if (qx_wire_new(&lw->w, conninfo, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

static int l_host(lua_State *L)
{
    lua_pushstring(L, qx_wire_host(check(L)->w));
    return 1;
}

static int l_port(lua_State *L)
{
    lua_pushinteger(L, qx_wire_port(check(L)->w));
    return 1;
}

/* wire:start(): a new socket; queues the startup message */
static int l_start(lua_State *L)
{
    lwire *lw = check(L);
    qx_wire_start(lw->w);
    return 0;
}

/* wire:output() -> the bytes to send as one string (now counted as sent), or nil when none */
static int l_output(lua_State *L)
{
    lwire *lw = check(L);
    size_t len;
    const char *p = qx_wire_output(lw->w, &len);
    if (p == NULL) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushlstring(L, p, len);
    qx_wire_sent(lw->w);
    return 1;
}

/* wire:feed(data) -> true (what was awaited came: send any output, then the caller goes on),
 * false (more is needed: send any output and receive) | nil, err */
static int l_feed(lua_State *L)
{
    lwire *lw = check(L);
    size_t len;
    const char *data = luaL_checklstring(L, 2, &len);
    int done = 0;
    qx_error err;
    if (qx_wire_feed(lw->w, data, len, &done, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, done);
    return 1;
}

/* wire:lost(why): the socket failed; a batch in progress ends with a connection error */
static int l_lost(lua_State *L)
{
    lwire *lw = check(L);
    qx_wire_lost(lw->w, luaL_optstring(L, 2, "the socket failed"));
    return 0;
}

static int l_broken(lua_State *L)
{
    lua_pushboolean(L, qx_wire_is_broken(check(L)->w));
    return 1;
}

static int l_ready(lua_State *L)
{
    lua_pushboolean(L, qx_wire_ready(check(L)->w));
    return 1;
}

static int l_busy(lua_State *L)
{
    lua_pushboolean(L, qx_wire_busy(check(L)->w));
    return 1;
}

/* the names conn:status gives a connection's */
static int l_tx_status(lua_State *L)
{
    lua_pushstring(L, qx_tx_status_name(qx_wire_tx_status(check(L)->w)));
    return 1;
}

static int l_pid(lua_State *L)
{
    lua_pushinteger(L, qx_wire_pid(check(L)->w));
    return 1;
}

static int l_auth(lua_State *L)
{
    lua_pushstring(L, qx_wire_auth(check(L)->w));
    return 1;
}

/* wire:parameter(name) -> the server's last ParameterStatus for it, or nil */
static int l_parameter(lua_State *L)
{
    lwire *lw = check(L);
    const char *v = qx_wire_parameter(lw->w, luaL_checkstring(L, 2));
    if (v == NULL)
        lua_pushnil(L);
    else
        lua_pushstring(L, v);
    return 1;
}

/* wire:batch({ { sql, p1, ..., pk[, n = k] }, ... }[, keep]) -> true | nil, err[, index]
 * Statements and parameters as conn:batch takes them; the bytes are queued (output). */
static int l_batch(lua_State *L)
{
    lwire *lw = check(L);
    int n, keep;
    qx_stmt *stmts;
    qx_result **results;
    qx_error err;

    luaL_checktype(L, 2, LUA_TTABLE);
    keep = lua_toboolean(L, 3);
    n = (int)qx_rawlen(L, 2);
    if (qx_wire_busy(lw->w)) {
        qx_error_set(&err, QX_ERR_INVALID, "another batch is in progress");
        return qx_push_error(L, &err);
    }
    stmts = lua_newuserdata(L, sizeof *stmts * (size_t)(n > 0 ? n : 1));
    if (!qx_batch_stmts(L, 2, n, stmts))
        return 3;
    results = calloc((size_t)(n > 0 ? n : 1), sizeof *results);
    if (results == NULL)
        return luaL_error(L, "out of memory");
    if (qx_wire_batch(lw->w, results, stmts, n, keep, &err) != QX_OK) {
        free(results);
        return qx_push_error(L, &err);
    }
    free_results(lw); /* none: the codec was not busy */
    lw->results = results;
    lw->n = n;
    lw->keep = keep;
    if (lw->list_ref != LUA_NOREF)
        luaL_unref(L, LUA_REGISTRYINDEX, lw->list_ref);
    lua_pushvalue(L, 2);
    lw->list_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushboolean(L, 1);
    return 1;
}

/* wire:batch_end() -> results (as conn:batch gives them) | nil, err, failed_index (nil when the
 * failure is not one statement's)[, kept: with keep, the results of the statements that
 * completed before it, false for the others] */
static int l_batch_end(lua_State *L)
{
    lwire *lw = check(L);
    int failed = -1, list;
    qx_error err;
    qx_status s;

    if (lw->results == NULL || qx_wire_tx_status(lw->w) == QX_TX_ACTIVE) {
        qx_error_set(&err, QX_ERR_INVALID,
                     lw->results == NULL ? "no batch to end" : "the batch has not ended yet");
        return qx_push_error(L, &err);
    }
    s = qx_wire_batch_end(lw->w, &failed, &err);
    lua_rawgeti(L, LUA_REGISTRYINDEX, lw->list_ref);
    list = lua_gettop(L);
    luaL_unref(L, LUA_REGISTRYINDEX, lw->list_ref);
    lw->list_ref = LUA_NOREF;
    if (s == QX_OK) {
        /* the results stay in lw->results until made: freed on close should that raise */
        qx_push_batch_results(L, lw->results, lw->n, 1, list);
        free_results(lw);
        return 1;
    }
    qx_push_error(L, &err);
    if (failed >= 0)
        lua_pushinteger(L, failed + 1);
    else
        lua_pushnil(L);
    if (!lw->keep) {
        free_results(lw);
        return 3;
    }
    qx_push_batch_results(L, lw->results, lw->n, 1, list);
    free_results(lw);
    return 4;
}

void qx_open_wire(lua_State *L)
{
    qx_register_type(L, &wire_type);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "wire");
}
