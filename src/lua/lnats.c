/* The NATS connection userdata: core.nats{...}, ensure_stream, publish, stream_info, close. */
#include <string.h>

#include "binding.h"

typedef struct lnats {
    qx_nats *n; /* NULL once closed */
} lnats;

qx_nats *qx_check_nats(lua_State *L, int idx)
{
    lnats *ln = luaL_checkudata(L, idx, QX_NATS_MT);
    if (ln->n == NULL)
        luaL_error(L, "NATS connection is closed");
    return ln->n;
}

static const char *opt_string_field(lua_State *L, int t, const char *name)
{
    const char *s = NULL;
    lua_getfield(L, t, name);
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "option '%s' must be a string", name);
        s = lua_tostring(L, -1); /* stays alive in the options table */
    }
    lua_pop(L, 1);
    return s;
}

static int opt_int_field(lua_State *L, int t, const char *name, int dflt, int min)
{
    long long v;
    int r = dflt;
    lua_getfield(L, t, name);
    if (!lua_isnil(L, -1)) {
        if (!qx_isinteger(L, -1, &v) || v < min || v > 0x7fffffff)
            luaL_error(L, "option '%s' must be an integer >= %d", name, min);
        r = (int)v;
    }
    lua_pop(L, 1);
    return r;
}

/* core.nats{ servers, name, user, password, token, creds_file, tls, tls_ca, tls_cert, tls_key,
 *            connect_timeout_ms, reconnect_attempts, reconnect_wait_ms, send_asap }
 *   -> nats | nil, err */
int qx_nats_new_lua(lua_State *L)
{
    qx_nats_options o;
    qx_error err;
    lnats *ln;
    const char *servers;

    luaL_checktype(L, 1, LUA_TTABLE);
    qx_nats_options_init(&o);
    servers = opt_string_field(L, 1, "servers");
    if (servers != NULL)
        o.servers = servers;
    o.name = opt_string_field(L, 1, "name");
    o.user = opt_string_field(L, 1, "user");
    o.password = opt_string_field(L, 1, "password");
    o.token = opt_string_field(L, 1, "token");
    o.creds_file = opt_string_field(L, 1, "creds_file");
    o.tls_ca = opt_string_field(L, 1, "tls_ca");
    o.tls_cert = opt_string_field(L, 1, "tls_cert");
    o.tls_key = opt_string_field(L, 1, "tls_key");
    lua_getfield(L, 1, "tls");
    o.tls = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, 1, "send_asap");
    if (!lua_isnil(L, -1))
        o.send_asap = lua_toboolean(L, -1);
    lua_pop(L, 1);
    o.connect_timeout_ms = opt_int_field(L, 1, "connect_timeout_ms", o.connect_timeout_ms, 1);
    o.reconnect_attempts = opt_int_field(L, 1, "reconnect_attempts", o.reconnect_attempts, -1);
    o.reconnect_wait_ms = opt_int_field(L, 1, "reconnect_wait_ms", o.reconnect_wait_ms, 0);

    /* closed first, then opened: an error in between leaks nothing */
    ln = lua_newuserdata(L, sizeof *ln);
    ln->n = NULL;
    qx_setmetatable(L, QX_NATS_MT);
    if (qx_nats_open(&ln->n, &o, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

/* nats:ensure_stream{ name =, subjects = { ... }, duplicate_window_ms = } -> true | nil, err */
static int l_ensure_stream(lua_State *L)
{
    qx_nats *n = qx_check_nats(L, 1);
    const char *name, **subjects;
    long long window = 0;
    int i, count;
    qx_error err;

    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "name");
    name = lua_tostring(L, -1);
    if (lua_type(L, -1) != LUA_TSTRING)
        return luaL_error(L, "ensure_stream: name must be a string");
    lua_getfield(L, 2, "subjects");
    if (!lua_istable(L, -1))
        return luaL_error(L, "ensure_stream: subjects must be a list of strings");
    count = (int)qx_rawlen(L, -1);
    subjects = lua_newuserdata(L, sizeof *subjects * (size_t)(count > 0 ? count : 1));
    for (i = 0; i < count; i++) {
        lua_rawgeti(L, -2, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "ensure_stream: subject %d must be a string", i + 1);
        subjects[i] = lua_tostring(L, -1); /* anchored by the subjects table */
        lua_pop(L, 1);
    }
    lua_getfield(L, 2, "duplicate_window_ms");
    if (!lua_isnil(L, -1) && (!qx_isinteger(L, -1, &window) || window < 0))
        return luaL_error(L, "ensure_stream: duplicate_window_ms must be an integer >= 0");
    if (qx_nats_ensure_stream(n, name, subjects, count, (int64_t)window, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

/* nats:publish(subject, data, headers?, msg_id?, timeout_ms?)
 *   -> { stream, sequence, duplicate } | nil, err */
static int l_publish(lua_State *L)
{
    qx_nats *n = qx_check_nats(L, 1);
    const char *subject = luaL_checkstring(L, 2);
    size_t len;
    const char *data = luaL_checklstring(L, 3, &len);
    const char *msg_id = luaL_optstring(L, 5, NULL);
    int timeout = (int)luaL_optinteger(L, 6, 0);
    qx_nats_header *headers = NULL;
    int nheaders = 0;
    qx_nats_ack ack;
    qx_error err;

    if (!lua_isnoneornil(L, 4)) {
        int count = 0;
        luaL_checktype(L, 4, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, 4) != 0) {
            count++;
            lua_pop(L, 1);
        }
        headers = lua_newuserdata(L, sizeof *headers * (size_t)(count > 0 ? count : 1));
        lua_createtable(L, count * 2, 0); /* anchors the texts: key, value, key, value, ... */
        lua_pushnil(L);
        while (lua_next(L, 4) != 0) {
            if (lua_type(L, -2) != LUA_TSTRING ||
                (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER))
                return luaL_error(L, "publish: headers must map strings to strings");
            lua_pushvalue(L, -2);
            headers[nheaders].key = lua_tostring(L, -1);
            lua_rawseti(L, -4, nheaders * 2 + 1);
            lua_pushvalue(L, -1);
            headers[nheaders].value = lua_tostring(L, -1); /* a number becomes its text */
            lua_rawseti(L, -4, nheaders * 2 + 2);
            nheaders++;
            lua_pop(L, 1);
        }
    }
    if (qx_nats_publish(n, &ack, subject, data, len, headers, nheaders, msg_id, timeout, &err) !=
        QX_OK)
        return qx_push_error(L, &err);
    lua_createtable(L, 0, 3);
    lua_pushstring(L, ack.stream);
    lua_setfield(L, -2, "stream");
    qx_pushint64(L, (long long)ack.sequence);
    lua_setfield(L, -2, "sequence");
    lua_pushboolean(L, ack.duplicate);
    lua_setfield(L, -2, "duplicate");
    return 1;
}

/* nats:stream_info(name) -> { messages, bytes, first_seq, last_seq, consumers, subjects } */
static int l_stream_info(lua_State *L)
{
    qx_nats *n = qx_check_nats(L, 1);
    qx_nats_stream_info si;
    qx_error err;
    if (qx_nats_stream_info_get(n, &si, luaL_checkstring(L, 2), &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_createtable(L, 0, 6);
    qx_pushint64(L, (long long)si.messages), lua_setfield(L, -2, "messages");
    qx_pushint64(L, (long long)si.bytes), lua_setfield(L, -2, "bytes");
    qx_pushint64(L, (long long)si.first_seq), lua_setfield(L, -2, "first_seq");
    qx_pushint64(L, (long long)si.last_seq), lua_setfield(L, -2, "last_seq");
    qx_pushint64(L, (long long)si.consumers), lua_setfield(L, -2, "consumers");
    qx_pushint64(L, (long long)si.subjects), lua_setfield(L, -2, "subjects");
    return 1;
}

/* nats:stream_get(name, seq) -> { sequence, subject, data, headers = { k = v } } | nil, err */
static int l_stream_get(lua_State *L)
{
    qx_nats *n = qx_check_nats(L, 1);
    const char *name = luaL_checkstring(L, 2);
    long long seq;
    qx_nats_stored *m = NULL;
    qx_error err;
    int i;
    if (!qx_isinteger(L, 3, &seq) || seq < 1)
        return luaL_argerror(L, 3, "sequence must be an integer >= 1");
    if (qx_nats_stream_get(n, &m, name, (uint64_t)seq, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_createtable(L, 0, 4);
    qx_pushint64(L, (long long)m->sequence), lua_setfield(L, -2, "sequence");
    lua_pushstring(L, m->subject), lua_setfield(L, -2, "subject");
    lua_pushlstring(L, m->data, (size_t)m->len), lua_setfield(L, -2, "data");
    lua_createtable(L, 0, m->nheaders);
    for (i = 0; i < m->nheaders; i++) {
        lua_pushstring(L, m->values[i]);
        lua_setfield(L, -2, m->keys[i]);
    }
    lua_setfield(L, -2, "headers");
    qx_nats_stored_free(m);
    return 1;
}

static int l_delete_stream(lua_State *L)
{
    qx_nats *n = qx_check_nats(L, 1);
    qx_error err;
    if (qx_nats_delete_stream(n, luaL_checkstring(L, 2), &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

/* nats:state() -> "connected" | "connecting" | "reconnecting" | "disconnected" | "closed" */
static int l_state(lua_State *L)
{
    lnats *ln = luaL_checkudata(L, 1, QX_NATS_MT);
    lua_pushstring(L, ln->n == NULL ? "closed" : qx_nats_state_name(qx_nats_get_state(ln->n)));
    return 1;
}

/* nats:stats() -> { state, reconnects, url } */
static int l_stats(lua_State *L)
{
    qx_nats *n = qx_check_nats(L, 1);
    char url[256];
    lua_createtable(L, 0, 3);
    lua_pushstring(L, qx_nats_state_name(qx_nats_get_state(n)));
    lua_setfield(L, -2, "state");
    qx_pushint64(L, qx_nats_reconnects(n));
    lua_setfield(L, -2, "reconnects");
    qx_nats_connected_url(n, url, sizeof url);
    lua_pushstring(L, url);
    lua_setfield(L, -2, "url");
    return 1;
}

static int l_is_nats(lua_State *L)
{
    lua_pushboolean(L, qx_testudata(L, 1, QX_NATS_MT) != NULL);
    return 1;
}

static int l_subject_valid(lua_State *L)
{
    lua_pushboolean(L, lua_type(L, 1) == LUA_TSTRING && qx_nats_subject_valid(lua_tostring(L, 1)));
    return 1;
}

/* close, __gc and __close; twice is harmless. A relay or consumer holding the connection keeps
 * it open until it is done with it. */
static int l_close(lua_State *L)
{
    lnats *ln = luaL_checkudata(L, 1, QX_NATS_MT);
    if (ln->n != NULL) {
        qx_nats *n = ln->n;
        ln->n = NULL;
        qx_nats_close(n);
    }
    return 0;
}

static int l_tostring(lua_State *L)
{
    lnats *ln = luaL_checkudata(L, 1, QX_NATS_MT);
    if (ln->n == NULL)
        lua_pushfstring(L, "qx.nats (closed, %p)", (void *)ln);
    else
        lua_pushfstring(L, "qx.nats (%s, %p)", qx_nats_state_name(qx_nats_get_state(ln->n)),
                        (void *)ln);
    return 1;
}

static const luaL_Reg methods[] = {
    { "ensure_stream", l_ensure_stream },
    { "publish", l_publish },
    { "stream_info", l_stream_info },
    { "stream_get", l_stream_get },
    { "delete_stream", l_delete_stream },
    { "state", l_state },
    { "stats", l_stats },
    { "close", l_close },
    { NULL, NULL }
};

/* Registers the metatable and adds nats, nats_subject_valid and is_nats to the module table
 * at the top of the stack. */
void qx_open_nats(lua_State *L)
{
    qx_register_type(L, QX_NATS_MT, methods, l_close, l_tostring);
    lua_pushcfunction(L, qx_nats_new_lua);
    lua_setfield(L, -2, "nats");
    lua_pushcfunction(L, l_subject_valid);
    lua_setfield(L, -2, "nats_subject_valid");
    lua_pushcfunction(L, l_is_nats);
    lua_setfield(L, -2, "is_nats");
}
