/* The JetStream pull consumer userdata: core.consumer(nats, {...}), consumer:fetch(),
 * ack/ack_sync/nak/term/in_progress of a fetched message, consumer:info(), consumer:close(). */
#include <stdio.h>

#include "binding.h"

typedef struct lconsumer {
    qx_consumer *c; /* NULL once closed */
} lconsumer;

static int l_fetch(lua_State *L);
static int l_ack(lua_State *L);
static int l_ack_sync(lua_State *L);
static int l_nak(lua_State *L);
static int l_term(lua_State *L);
static int l_in_progress(lua_State *L);
static int l_info(lua_State *L);

static const luaL_Reg methods[] = {
    { "fetch", l_fetch },
    { "ack", l_ack },
    { "ack_sync", l_ack_sync },
    { "nak", l_nak },
    { "term", l_term },
    { "in_progress", l_in_progress },
    { "info", l_info },
    { NULL, NULL }
};

/* close, __gc and __close. Messages of the last fetch that got no reply are redelivered by the
 * server after their ack wait. */
static void consumer_close(lua_State *L, void *ud)
{
    lconsumer *lc = ud;
    (void)L;
    qx_consumer_free(lc->c);
    lc->c = NULL;
}

static void consumer_describe(void *ud, char *buf, size_t size)
{
    lconsumer *lc = ud;
    snprintf(buf, size, "%s/%s", qx_consumer_stream(lc->c), qx_consumer_durable(lc->c));
}

static const qx_type consumer_type = {
    QX_CONSUMER_MT, methods, "close", consumer_close, consumer_describe, "closed", NULL
};

static lconsumer *check_consumer(lua_State *L)
{
    return qx_check_open(L, 1, &consumer_type, "consumer is closed");
}

static const char *const consumer_options[] = {
    "stream", "durable", "filter_subject", "max_deliver", "ack_wait_ms", "max_ack_pending",
    "create", NULL
};

/* core.consumer(nats, { stream, durable, filter_subject, max_deliver, ack_wait_ms,
 *                       max_ack_pending, create }) -> consumer | nil, err */
static int l_consumer_new(lua_State *L)
{
    static const char what[] = "core.consumer";
    qx_nats *n = qx_check_nats(L, 1);
    qx_consumer_options o;
    qx_error err;
    lconsumer *lc;

    qx_opt_check(L, 2, what, consumer_options);
    qx_consumer_options_init(&o);
    o.stream = qx_opt_string(L, 2, what, "stream", NULL, 1);
    o.durable = qx_opt_string(L, 2, what, "durable", NULL, 1);
    o.filter_subject = qx_opt_string(L, 2, what, "filter_subject", NULL, 0);
    o.max_deliver = qx_opt_int(L, 2, what, "max_deliver", -1, 0x7fffffff, o.max_deliver);
    o.ack_wait_ms = (int)qx_opt_int(L, 2, what, "ack_wait_ms", 1, 0x7fffffff, o.ack_wait_ms);
    o.max_ack_pending = (int)qx_opt_int(L, 2, what, "max_ack_pending", 1, 0x7fffffff,
                                        o.max_ack_pending);
    o.create = qx_opt_bool(L, 2, what, "create", o.create);

    lc = qx_new_closed(L, &consumer_type, sizeof *lc);
    if (qx_consumer_new(&lc->c, n, &o, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

static void push_headers(lua_State *L, qx_consumer *c, int i)
{
    const char **keys = NULL, **values = NULL;
    int n = 0, j;
    qx_error err;
    if (qx_consumer_msg_headers(c, i, &keys, &values, &n, &err) != QX_OK) {
        lua_newtable(L); /* unreadable headers: the body still counts */
        return;
    }
    lua_createtable(L, 0, n);
    for (j = 0; j < n; j++) {
        lua_pushstring(L, values[j]);
        lua_setfield(L, -2, keys[j]);
    }
    qx_free((void *)keys);
    qx_free((void *)values);
}

/* consumer:fetch(batch, timeout_ms) -> { msg... } (empty when nothing came in time) | nil, err
 * msg: { subject, data, headers, stream, consumer, stream_seq, consumer_seq, delivered,
 *        pending, published_at, timestamp }; its position in the list is its index for replies. */
static int l_fetch(lua_State *L)
{
    lconsumer *lc = check_consumer(L);
    long long batch, timeout;
    int count = 0, i;
    qx_error err;

    if (!qx_isinteger(L, 2, &batch) || batch < 1 || batch > 100000)
        return luaL_argerror(L, 2, "batch must be an integer between 1 and 100000");
    if (!qx_isinteger(L, 3, &timeout) || timeout < 1 || timeout > 0x7fffffff)
        return luaL_argerror(L, 3, "timeout_ms must be a positive integer");
    if (qx_consumer_fetch(lc->c, &count, (int)batch, (int)timeout, &err) != QX_OK)
        return qx_push_error(L, &err);

    lua_createtable(L, count, 0);
    for (i = 0; i < count; i++) {
        qx_consumer_msg m;
        if (qx_consumer_msg_get(lc->c, i, &m, &err) != QX_OK)
            return qx_push_error(L, &err);
        lua_createtable(L, 0, 12);
        lua_pushstring(L, m.subject), lua_setfield(L, -2, "subject");
        lua_pushlstring(L, m.data, (size_t)m.data_len), lua_setfield(L, -2, "data");
        lua_pushstring(L, m.stream), lua_setfield(L, -2, "stream");
        lua_pushstring(L, m.consumer), lua_setfield(L, -2, "consumer");
        qx_pushint64(L, (long long)m.stream_seq), lua_setfield(L, -2, "stream_seq");
        qx_pushint64(L, (long long)m.consumer_seq), lua_setfield(L, -2, "consumer_seq");
        qx_pushint64(L, (long long)m.delivered), lua_setfield(L, -2, "delivered");
        qx_pushint64(L, (long long)m.pending), lua_setfield(L, -2, "pending");
        lua_pushstring(L, m.published_at), lua_setfield(L, -2, "published_at");
        lua_pushnumber(L, (lua_Number)m.timestamp_ns / 1e9), lua_setfield(L, -2, "timestamp");
        push_headers(L, lc->c, i);
        lua_setfield(L, -2, "headers");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int reply(lua_State *L, qx_reply kind)
{
    lconsumer *lc = check_consumer(L);
    long long i, delay = 0;
    qx_error err;
    if (!qx_isinteger(L, 2, &i))
        return luaL_argerror(L, 2, "expected the message's index in the last fetch");
    if (kind == QX_REPLY_NAK && !lua_isnoneornil(L, 3) &&
        (!qx_isinteger(L, 3, &delay) || delay < 0))
        return luaL_argerror(L, 3, "delay_ms must be a non-negative integer");
    if (i < 1 || i > 0x7fffffff)
        return luaL_argerror(L, 2, "index out of range");
    if (qx_consumer_reply(lc->c, (int)i - 1, kind, (int64_t)delay, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_ack(lua_State *L) { return reply(L, QX_REPLY_ACK); }
static int l_ack_sync(lua_State *L) { return reply(L, QX_REPLY_ACK_SYNC); }
static int l_nak(lua_State *L) { return reply(L, QX_REPLY_NAK); }
static int l_term(lua_State *L) { return reply(L, QX_REPLY_TERM); }
static int l_in_progress(lua_State *L) { return reply(L, QX_REPLY_IN_PROGRESS); }

/* consumer:info() -> { num_pending, num_ack_pending, num_redelivered, num_waiting,
 *                      delivered_stream_seq, ack_floor_stream_seq, max_deliver, ack_wait_ms,
 *                      max_ack_pending, stream, durable } | nil, err */
static int l_info(lua_State *L)
{
    lconsumer *lc = check_consumer(L);
    qx_consumer_info ci;
    qx_error err;
    if (qx_consumer_info_get(lc->c, &ci, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_createtable(L, 0, 11);
    qx_pushint64(L, (long long)ci.num_pending), lua_setfield(L, -2, "num_pending");
    qx_pushint64(L, ci.num_ack_pending), lua_setfield(L, -2, "num_ack_pending");
    qx_pushint64(L, ci.num_redelivered), lua_setfield(L, -2, "num_redelivered");
    qx_pushint64(L, ci.num_waiting), lua_setfield(L, -2, "num_waiting");
    qx_pushint64(L, (long long)ci.delivered_stream_seq), lua_setfield(L, -2, "delivered_stream_seq");
    qx_pushint64(L, (long long)ci.ack_floor_stream_seq), lua_setfield(L, -2, "ack_floor_stream_seq");
    qx_pushint64(L, ci.max_deliver), lua_setfield(L, -2, "max_deliver");
    qx_pushint64(L, ci.ack_wait_ms), lua_setfield(L, -2, "ack_wait_ms");
    qx_pushint64(L, ci.max_ack_pending), lua_setfield(L, -2, "max_ack_pending");
    lua_pushstring(L, qx_consumer_stream(lc->c)), lua_setfield(L, -2, "stream");
    lua_pushstring(L, qx_consumer_durable(lc->c)), lua_setfield(L, -2, "durable");
    return 1;
}

/* Registers the metatable and adds consumer to the table at the top (the module). */
void qx_open_consumer(lua_State *L)
{
    qx_register_type(L, &consumer_type);
    lua_pushcfunction(L, l_consumer_new);
    lua_setfield(L, -2, "consumer");
}
