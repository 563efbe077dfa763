/* The JetStream pull consumer userdata: core.consumer(nats, {...}), consumer:fetch(),
 * consumer:info(), consumer:close(); and the message userdata fetch hands out: its fields, and
 * ack/ack_sync/nak/term/in_progress. A message stays valid after later fetches. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "binding.h"

typedef struct lconsumer {
    qx_consumer *c; /* NULL once closed */
} lconsumer;

typedef struct lmsg {
    qx_consumer_msg *m; /* NULL once freed */
} lmsg;

/* The messages of one fetch between the core and their userdata: whatever is not handed out
 * yet is freed with it, should making a userdata fail. */
typedef struct lbatch {
    qx_consumer_msg **msgs;
    int count;
} lbatch;

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

static void msg_close(lua_State *L, void *ud)
{
    lmsg *lm = ud;
    (void)L;
    qx_consumer_msg_free(lm->m); /* unanswered: redelivered after the ack wait */
    lm->m = NULL;
}

static void msg_describe(void *ud, char *buf, size_t size)
{
    lmsg *lm = ud;
    qx_consumer_msg_info mi;
    qx_consumer_msg_info_get(lm->m, &mi);
    snprintf(buf, size, "%s #%" PRIu64 "%s", mi.stream, mi.stream_seq,
             mi.replied ? ", answered" : "");
}

static void batch_close(lua_State *L, void *ud)
{
    lbatch *b = ud;
    int i;
    (void)L;
    for (i = 0; i < b->count; i++)
        qx_consumer_msg_free(b->msgs[i]);
    qx_free(b->msgs);
    b->msgs = NULL;
    b->count = 0;
}

static int l_fetch(lua_State *L);
static int l_info(lua_State *L);
static int l_ack(lua_State *L);
static int l_ack_sync(lua_State *L);
static int l_nak(lua_State *L);
static int l_term(lua_State *L);
static int l_in_progress(lua_State *L);

static const luaL_Reg consumer_methods[] = {
    { "fetch", l_fetch },
    { "info", l_info },
    { NULL, NULL }
};

static const luaL_Reg msg_methods[] = {
    { "ack", l_ack },
    { "ack_sync", l_ack_sync },
    { "nak", l_nak },
    { "term", l_term },
    { "in_progress", l_in_progress },
    { NULL, NULL }
};

static const luaL_Reg no_methods[] = { { NULL, NULL } };

static const qx_type consumer_type = {
    QX_CONSUMER_MT, consumer_methods, "close", consumer_close, consumer_describe, "closed", NULL
};
static int msg_index(lua_State *L);
static const qx_type msg_type = {
    QX_CONSUMER_MSG_MT, msg_methods, NULL, msg_close, msg_describe, "freed", msg_index
};
static const qx_type batch_type = {
    "qx.consumer_batch", no_methods, NULL, batch_close, NULL, "empty", NULL
};

static lconsumer *check_consumer(lua_State *L)
{
    return qx_check_open(L, 1, &consumer_type, "consumer is closed");
}

static const char *const consumer_options[] = {
    "stream", "durable", "filter_subject", "max_deliver", "ack_wait_ms", "max_ack_pending",
    "create", "deliver", "start_sequence", "start_time", NULL
};

static const char *const deliver_names[] = { "all", "new", "from_sequence", "from_time", NULL };

/* core.consumer(nats, { stream, durable, filter_subject, max_deliver, ack_wait_ms,
 *                       max_ack_pending, create, deliver = "all" | "new" | "from_sequence" |
 *                       "from_time", start_sequence, start_time = ISO-8601 })
 *   -> consumer | nil, err */
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
    {
        const char *deliver = qx_opt_string(L, 2, what, "deliver", "all", 0);
        const char *start_time = qx_opt_string(L, 2, what, "start_time", NULL, 0);
        int i;
        for (i = 0; deliver_names[i] != NULL && strcmp(deliver_names[i], deliver) != 0; i++)
            ;
        if (deliver_names[i] == NULL)
            return luaL_error(L, "%s: deliver must be all, new, from_sequence or from_time", what);
        o.deliver = (qx_deliver)i;
        o.start_sequence = (uint64_t)qx_opt_int(L, 2, what, "start_sequence", 1, LLONG_MAX, 0);
        if (o.deliver == QX_DELIVER_FROM_SEQUENCE && o.start_sequence == 0)
            return luaL_error(L, "%s: deliver = from_sequence needs start_sequence", what);
        if (o.deliver == QX_DELIVER_FROM_TIME) {
            if (start_time == NULL)
                return luaL_error(L, "%s: deliver = from_time needs start_time", what);
            if (qx_iso8601_parse(&o.start_time_ns, start_time, &err) != QX_OK)
                return qx_push_error(L, &err);
        }
    }

    lc = qx_new_closed(L, &consumer_type, sizeof *lc);
    if (qx_consumer_new(&lc->c, n, &o, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

/* consumer:fetch(batch, timeout_ms) -> { msg... } (empty when nothing came in time) | nil, err */
static int l_fetch(lua_State *L)
{
    lconsumer *lc = check_consumer(L);
    long long batch, timeout;
    lbatch *b;
    int i;
    qx_error err;

    if (!qx_isinteger(L, 2, &batch) || batch < 1 || batch > 100000)
        return luaL_argerror(L, 2, "batch must be an integer between 1 and 100000");
    if (!qx_isinteger(L, 3, &timeout) || timeout < 1 || timeout > 0x7fffffff)
        return luaL_argerror(L, 3, "timeout_ms must be a positive integer");
    b = qx_new_closed(L, &batch_type, sizeof *b);
    if (qx_consumer_fetch(lc->c, &b->msgs, &b->count, (int)batch, (int)timeout, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_createtable(L, b->count, 0);
    for (i = 0; i < b->count; i++) {
        lmsg *lm = qx_new_closed(L, &msg_type, sizeof *lm);
        lm->m = b->msgs[i];
        b->msgs[i] = NULL;
        lua_rawseti(L, -2, i + 1);
    }
    batch_close(L, b); /* all handed out: only the array is left */
    return 1;
}

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

/* ---- messages --------------------------------------------------------------------------- */

static lmsg *check_msg(lua_State *L)
{
    return qx_check_open(L, 1, &msg_type, "message was freed");
}

static void push_headers(lua_State *L, qx_consumer_msg *m)
{
    const char **keys = NULL, **values = NULL;
    int n = 0, j;
    qx_error err;
    if (qx_consumer_msg_headers(m, &keys, &values, &n, &err) != QX_OK) {
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

/* __index: the methods (upvalue 1), then msg.subject, .data, .headers, .stream, .consumer,
 * .stream_seq, .consumer_seq, .delivered, .pending, .published_at, .timestamp, .replied. */
static int msg_index(lua_State *L)
{
    lmsg *lm = check_msg(L);
    const char *k = luaL_checkstring(L, 2);
    qx_consumer_msg_info mi;

    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    if (!lua_isnil(L, -1))
        return 1;
    lua_pop(L, 1);
    if (strcmp(k, "headers") == 0) {
        push_headers(L, lm->m);
        return 1;
    }
    qx_consumer_msg_info_get(lm->m, &mi);
    if (strcmp(k, "subject") == 0)
        lua_pushstring(L, mi.subject);
    else if (strcmp(k, "data") == 0)
        lua_pushlstring(L, mi.data, (size_t)mi.data_len);
    else if (strcmp(k, "stream") == 0)
        lua_pushstring(L, mi.stream);
    else if (strcmp(k, "consumer") == 0)
        lua_pushstring(L, mi.consumer);
    else if (strcmp(k, "stream_seq") == 0)
        qx_pushint64(L, (long long)mi.stream_seq);
    else if (strcmp(k, "consumer_seq") == 0)
        qx_pushint64(L, (long long)mi.consumer_seq);
    else if (strcmp(k, "delivered") == 0)
        qx_pushint64(L, (long long)mi.delivered);
    else if (strcmp(k, "pending") == 0)
        qx_pushint64(L, (long long)mi.pending);
    else if (strcmp(k, "published_at") == 0)
        lua_pushstring(L, mi.published_at);
    else if (strcmp(k, "timestamp") == 0)
        lua_pushnumber(L, (lua_Number)mi.timestamp_ns / 1e9);
    else if (strcmp(k, "replied") == 0)
        lua_pushboolean(L, mi.replied);
    else
        lua_pushnil(L);
    return 1;
}

/* msg:ack() / ack_sync() / nak([delay_ms]) / term() / in_progress() -> true | nil, err
 * A second final reply is an "invalid" error; a reply after the consumer closed "closed". */
static int reply(lua_State *L, qx_reply kind)
{
    lmsg *lm = check_msg(L);
    long long delay = 0;
    qx_error err;
    if (kind == QX_REPLY_NAK && !lua_isnoneornil(L, 2) &&
        (!qx_isinteger(L, 2, &delay) || delay < 0))
        return luaL_argerror(L, 2, "delay_ms must be a non-negative integer");
    if (qx_consumer_msg_reply(lm->m, kind, (int64_t)delay, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_ack(lua_State *L) { return reply(L, QX_REPLY_ACK); }
static int l_ack_sync(lua_State *L) { return reply(L, QX_REPLY_ACK_SYNC); }
static int l_nak(lua_State *L) { return reply(L, QX_REPLY_NAK); }
static int l_term(lua_State *L) { return reply(L, QX_REPLY_TERM); }
static int l_in_progress(lua_State *L) { return reply(L, QX_REPLY_IN_PROGRESS); }

/* Registers the metatables and adds consumer to the table at the top (the module). */
void qx_open_consumer(lua_State *L)
{
    qx_register_type(L, &consumer_type);
    qx_register_type(L, &batch_type);
    qx_register_type(L, &msg_type);
    lua_pushcfunction(L, l_consumer_new);
    lua_setfield(L, -2, "consumer");
}
