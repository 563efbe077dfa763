/* luaopen_qx_core: the module table, the error shape, ids and clocks. */
#define _GNU_SOURCE /* dladdr */
#include <dlfcn.h>
#include <string.h>

#include "binding.h"

int qx_push_error_msg(lua_State *L, const char *code, const char *message)
{
    lua_pushnil(L);
    lua_createtable(L, 0, 4);
    lua_pushstring(L, code);
    lua_setfield(L, -2, "code");
    lua_pushstring(L, message);
    lua_setfield(L, -2, "message");
    qx_setmetatable(L, QX_ERROR_MT);
    return 2;
}

int qx_push_error(lua_State *L, const qx_error *err)
{
    qx_push_error_msg(L, qx_status_name(err->status), err->message);
    if (err->sqlstate[0] != '\0') {
        lua_pushstring(L, err->sqlstate);
        lua_setfield(L, -2, "sqlstate");
    }
    if (err->retryable) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "retryable");
    }
    return 2;
}

/* core.dir_list(path) -> { names... } | nil, err: the regular files of a folder, in no order */
static int l_dir_list(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    char **names;
    size_t n, i;
    qx_error err;
    if (qx_dir_list(&names, &n, path, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_createtable(L, (int)n, 0);
    for (i = 0; i < n; i++) {
        lua_pushstring(L, names[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    qx_dir_list_free(names, n);
    return 1;
}

static int error_tostring(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "code");
    lua_getfield(L, 1, "message");
    lua_getfield(L, 1, "sqlstate");
    if (lua_isstring(L, -1))
        lua_pushfstring(L, "%s: %s (SQLSTATE %s)", luaL_optstring(L, -3, "error"),
                        luaL_optstring(L, -2, ""), lua_tostring(L, -1));
    else
        lua_pushfstring(L, "%s: %s", luaL_optstring(L, -3, "error"), luaL_optstring(L, -2, ""));
    return 1;
}

static int l_uuid(lua_State *L)
{
    char buf[QX_UUID_STRLEN + 1];
    qx_error err;
    if (qx_uuid7(buf, &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    lua_pushlstring(L, buf, QX_UUID_STRLEN);
    return 1;
}

static int l_is_uuid(lua_State *L)
{
    size_t len;
    const char *s = lua_tolstring(L, 1, &len);
    lua_pushboolean(L, lua_type(L, 1) == LUA_TSTRING && qx_uuid_valid(s, len));
    return 1;
}

static int l_now(lua_State *L)
{
    char buf[QX_ISO8601_STRLEN + 1];
    qx_now_iso8601(buf);
    lua_pushlstring(L, buf, QX_ISO8601_STRLEN);
    return 1;
}

static int l_clock(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)qx_clock());
    return 1;
}

static int l_time(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)qx_time());
    return 1;
}

/* traceparent_check(s), tracestate_check(s) -> true | false, why (W3C Trace Context syntax) */
static int trace_check_result(lua_State *L, int ok, const char *why)
{
    lua_pushboolean(L, ok);
    if (ok)
        return 1;
    lua_pushstring(L, why);
    return 2;
}

static int l_traceparent_check(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    const char *why = NULL;
    int ok = qx_traceparent_check(s, n, &why); /* before why is read */
    return trace_check_result(L, ok, why);
}

static int l_tracestate_check(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    const char *why = NULL;
    int ok = qx_tracestate_check(s, n, &why); /* before why is read */
    return trace_check_result(L, ok, why);
}

/* prefixed_key(t, prefix[, skip[, after]]) -> the first key of t (raw, in lua_next order) whose
 * value is a string that begins with prefix, leaving out the keys that skip (a table) maps to a
 * true value; nil when there is none. Given after (a key of t), the search goes on after it, so
 * a loop visits only the fields that match. One C pass where a Lua loop would call type, byte
 * and sub for every field. */
static int l_prefixed_key(lua_State *L)
{
    size_t plen;
    const char *prefix;
    int skip;
    luaL_checktype(L, 1, LUA_TTABLE);
    prefix = luaL_checklstring(L, 2, &plen);
    skip = !lua_isnoneornil(L, 3);
    if (skip)
        luaL_checktype(L, 3, LUA_TTABLE);
    lua_settop(L, 4); /* after (or nil) on top: where lua_next starts */
    while (lua_next(L, 1) != 0) {
        if (lua_type(L, -1) == LUA_TSTRING) {
            size_t n;
            const char *s = lua_tolstring(L, -1, &n);
            if (n >= plen && memcmp(s, prefix, plen) == 0) {
                int left_out = 0;
                if (skip) {
                    lua_pushvalue(L, -2);
                    lua_rawget(L, 3);
                    left_out = lua_toboolean(L, -1);
                    lua_pop(L, 1);
                }
                if (!left_out) {
                    lua_pop(L, 1);
                    return 1; /* the key */
                }
            }
        }
        lua_pop(L, 1);
    }
    lua_pushnil(L);
    return 1;
}

/* signals_watch(on): SIGTERM/SIGINT set a flag instead of ending the process (or no longer). */
static int l_signals_watch(lua_State *L)
{
    qx_signals_watch(lua_toboolean(L, 1));
    return 0;
}

/* signals_sleep(ms) -> whether SIGTERM/SIGINT came (before or during the sleep) */
static int l_signals_sleep(lua_State *L)
{
    lua_Integer ms = luaL_checkinteger(L, 1);
    luaL_argcheck(L, ms >= 0 && ms <= 2147483647, 1, "expected milliseconds >= 0");
    lua_pushboolean(L, qx_signals_sleep((int)ms));
    return 1;
}

static const luaL_Reg funcs[] = {
    { "uuid", l_uuid },
    { "is_uuid", l_is_uuid },
    { "now", l_now },
    { "clock", l_clock },
    { "time", l_time },
    { "traceparent_check", l_traceparent_check },
    { "tracestate_check", l_tracestate_check },
    { "prefixed_key", l_prefixed_key },
    { "dir_list", l_dir_list },
    { "signals_watch", l_signals_watch },
    { "signals_sleep", l_signals_sleep },
    { NULL, NULL }
};

#if defined(_WIN32)
#define QX_EXPORT __declspec(dllexport)
#else
#define QX_EXPORT __attribute__((visibility("default")))
#endif

QX_EXPORT int luaopen_qx_core(lua_State *L)
{
    /* Keep this module (and libnats with it) mapped until the process ends: lua_close unloads C
     * modules while nats.c's library threads may still be running their code. */
    Dl_info self;
    if (dladdr((void *)luaopen_qx_core, &self) != 0 && self.dli_fname != NULL)
        dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);

    if (luaL_newmetatable(L, QX_ERROR_MT)) {
        lua_pushcfunction(L, error_tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
    qx_open_pool(L);
    qx_open_conn(L);

    qx_newlib(L, funcs);
    qx_open_crypto(L);
    qx_open_sealed(L);
    qx_open_json(L);
    qx_open_nats(L);
    qx_open_relay(L);
    qx_open_httpd(L);
    qx_open_consumer(L);
    qx_open_tx(L);
    qx_open_wire(L);
    lua_pushlightuserdata(L, NULL); /* JSON null; the same value as cjson.null */
    lua_setfield(L, -2, "null");
    luaL_getmetatable(L, QX_ERROR_MT);
    lua_setfield(L, -2, "error_mt");
    lua_pushcfunction(L, qx_pool_new_lua);
    lua_setfield(L, -2, "pool");
    lua_pushliteral(L, "0.1.0");
    lua_setfield(L, -2, "_VERSION");
    return 1;
}
