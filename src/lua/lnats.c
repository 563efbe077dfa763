/* The NATS connection userdata: core.nats{...}, ensure_stream, publish, stream_info, close. */
#include <stdio.h>
#include <string.h>

#include "binding.h"

typedef struct lnats {
    qx_nats *n; /* NULL once closed */
} lnats;

static int l_ensure_stream(lua_State *L);
static int l_publish(lua_State *L);
static int l_stream_info(lua_State *L);
static int l_stream_get(lua_State *L);
static int l_delete_stream(lua_State *L);
static int l_state(lua_State *L);
static int l_stats(lua_State *L);

static const luaL_Reg methods[] = {
    { "ensure_stream", l_ensure_stream },
    { "publish", l_publish },
    { "stream_info", l_stream_info },
    { "stream_get", l_stream_get },
    { "delete_stream", l_delete_stream },
    { "state", l_state },
    { "stats", l_stats },
    { NULL, NULL }
};

/* close, __gc and __close. A relay or consumer holding the connection keeps it open until it
 * is done with it. */
static void nats_close(lua_State *L, void *ud)
{
    lnats *ln = ud;
    qx_nats *n = ln->n;
    (void)L;
    ln->n = NULL;
    qx_nats_close(n);
}

static void nats_describe(void *ud, char *buf, size_t size)
{
    snprintf(buf, size, "%s", qx_nats_state_name(qx_nats_get_state(((lnats *)ud)->n)));
}

static const qx_type nats_type = {
    QX_NATS_MT, methods, "close", nats_close, nats_describe, "closed", NULL
};

qx_nats *qx_check_nats(lua_State *L, int idx)
{
    lnats *ln = qx_check_open(L, idx, &nats_type, "NATS connection is closed");
    return ln->n;
}

static const char *const nats_options[] = {
    "servers", "name", "user", "password", "token", "creds_file", "tls", "tls_ca", "tls_cert",
    "tls_key", "connect_timeout_ms", "reconnect_attempts", "reconnect_wait_ms", "ping_interval_ms", "max_pings_out",
    "send_asap", NULL
};

/* core.nats{ servers, name, user, password, token, creds_file, tls, tls_ca, tls_cert, tls_key,
 *            connect_timeout_ms, reconnect_attempts, reconnect_wait_ms, ping_interval_ms,
 *            max_pings_out, send_asap }
 *   -> nats | nil, err */
int qx_nats_new_lua(lua_State *L)
{
    static const char what[] = "core.nats";
    qx_nats_options o;
    qx_error err;
    lnats *ln;

    qx_opt_check(L, 1, what, nats_options);
    qx_nats_options_init(&o);
    o.servers = qx_opt_string(L, 1, what, "servers", o.servers, 0);
    o.name = qx_opt_string(L, 1, what, "name", NULL, 0);
    o.user = qx_opt_string(L, 1, what, "user", NULL, 0);
    o.password = qx_opt_string(L, 1, what, "password", NULL, 0);
    o.token = qx_opt_string(L, 1, what, "token", NULL, 0);
    o.creds_file = qx_opt_string(L, 1, what, "creds_file", NULL, 0);
    o.tls_ca = qx_opt_string(L, 1, what, "tls_ca", NULL, 0);
    o.tls_cert = qx_opt_string(L, 1, what, "tls_cert", NULL, 0);
    o.tls_key = qx_opt_string(L, 1, what, "tls_key", NULL, 0);
    o.tls = qx_opt_bool(L, 1, what, "tls", 0);
    o.send_asap = qx_opt_bool(L, 1, what, "send_asap", o.send_asap);
    o.connect_timeout_ms = (int)qx_opt_int(L, 1, what, "connect_timeout_ms", 1, 0x7fffffff,
                                           o.connect_timeout_ms);
    o.reconnect_attempts = (int)qx_opt_int(L, 1, what, "reconnect_attempts", -1, 0x7fffffff,
                                           o.reconnect_attempts);
    o.reconnect_wait_ms = (int)qx_opt_int(L, 1, what, "reconnect_wait_ms", 0, 0x7fffffff,
                                          o.reconnect_wait_ms);
    o.ping_interval_ms = (int)qx_opt_int(L, 1, what, "ping_interval_ms", 1, 0x7fffffff,
                                         o.ping_interval_ms);
    o.max_pings_out = (int)qx_opt_int(L, 1, what, "max_pings_out", 1, 0x7fffffff,
                                      o.max_pings_out);

    ln = qx_new_closed(L, &nats_type, sizeof *ln);
    if (qx_nats_open(&ln->n, &o, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

/* nats:ensure_stream{ name =, subjects = { ... }, duplicate_window_ms =, replicas =,
 *                    max_msg_size = } -> true | nil, err */
static int l_ensure_stream(lua_State *L)
{
    static const char what[] = "nats:ensure_stream";
    static const char *const stream_options[] = {
        "name", "subjects", "duplicate_window_ms", "replicas", "max_msg_size", NULL
    };
    qx_nats *n = qx_check_nats(L, 1);
    qx_nats_stream_options so;
    const char **subjects;
    int i, count;
    qx_error err;

    qx_opt_check(L, 2, what, stream_options);
    memset(&so, 0, sizeof so);
    so.name = qx_opt_string(L, 2, what, "name", NULL, 1);
    so.duplicate_window_ms = (int64_t)qx_opt_int(L, 2, what, "duplicate_window_ms", 0,
                                                 0x7fffffffffffLL, 0);
    so.replicas = (int)qx_opt_int(L, 2, what, "replicas", 1, 5, 1);
    so.max_msg_size = (int32_t)qx_opt_int(L, 2, what, "max_msg_size", 1, 0x7fffffff, 0);
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
    so.subjects = subjects;
    so.nsubjects = count;
    if (qx_nats_ensure_stream(n, &so, &err) != QX_OK)
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

/* Registers the metatable and adds nats, nats_subject_valid and is_nats to the module table
 * at the top of the stack. */
void qx_open_nats(lua_State *L)
{
    qx_register_type(L, &nats_type);
    lua_pushcfunction(L, qx_nats_new_lua);
    lua_setfield(L, -2, "nats");
    lua_pushcfunction(L, l_subject_valid);
    lua_setfield(L, -2, "nats_subject_valid");
    lua_pushcfunction(L, l_is_nats);
    lua_setfield(L, -2, "is_nats");
}
