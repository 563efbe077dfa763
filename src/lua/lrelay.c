/* The relay userdata: core.relay{...}, run_once, run, stop, stats, close. */
#include <string.h>

#include "binding.h"

#define QX_RELAY_MT "qx.relay"

typedef struct lrelay {
    qx_relay *r;  /* NULL once closed */
    int running;  /* inside run(): close() only stops it, run() frees it on the way out */
    int closing;
} lrelay;

static lrelay *check_relay(lua_State *L)
{
    lrelay *lr = luaL_checkudata(L, 1, QX_RELAY_MT);
    if (lr->r == NULL || lr->closing)
        luaL_error(L, "relay is closed");
    return lr;
}

static int opt_int(lua_State *L, int t, const char *name, int dflt)
{
    long long v;
    int r = dflt;
    lua_getfield(L, t, name);
    if (!lua_isnil(L, -1)) {
        if (!qx_isinteger(L, -1, &v) || v < -0x7fffffffLL || v > 0x7fffffff)
            luaL_error(L, "relay option '%s' must be an integer", name);
        r = (int)v;
    }
    lua_pop(L, 1);
    return r;
}

static const char *opt_str(lua_State *L, int t, const char *name, const char *dflt)
{
    const char *s = dflt;
    lua_getfield(L, t, name);
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "relay option '%s' must be a string", name);
        s = lua_tostring(L, -1); /* anchored by the options table */
    }
    lua_pop(L, 1);
    return s;
}

/* core.relay{ conninfo, nats, subject_prefix, channel, batch_size, max_in_flight,
 *             ack_timeout_ms, max_attempts, base_delay_ms, max_delay_ms, poll_interval_ms,
 *             idle_interval_ms, shard_id, shard_count, lock_retry_ms, connect_timeout_ms,
 *             statement_timeout_ms, delete_published } -> relay | nil, err */
static int l_new(lua_State *L)
{
    qx_relay_options o;
    qx_error err;
    lrelay *lr;

    luaL_checktype(L, 1, LUA_TTABLE);
    qx_relay_options_init(&o);
    o.conninfo = opt_str(L, 1, "conninfo", NULL);
    lua_getfield(L, 1, "nats");
    o.nats = qx_check_nats(L, -1); /* the relay retains it */
    lua_pop(L, 1);
    o.subject_prefix = opt_str(L, 1, "subject_prefix", o.subject_prefix);
    o.channel = opt_str(L, 1, "channel", o.channel);
    o.batch_size = opt_int(L, 1, "batch_size", o.batch_size);
    o.max_in_flight = opt_int(L, 1, "max_in_flight", o.max_in_flight);
    o.ack_timeout_ms = opt_int(L, 1, "ack_timeout_ms", o.ack_timeout_ms);
    o.max_attempts = opt_int(L, 1, "max_attempts", o.max_attempts);
    o.base_delay_ms = opt_int(L, 1, "base_delay_ms", o.base_delay_ms);
    o.max_delay_ms = opt_int(L, 1, "max_delay_ms", o.max_delay_ms);
    o.poll_interval_ms = opt_int(L, 1, "poll_interval_ms", o.poll_interval_ms);
    o.idle_interval_ms = opt_int(L, 1, "idle_interval_ms", o.idle_interval_ms);
    o.shard_id = opt_int(L, 1, "shard_id", o.shard_id);
    o.shard_count = opt_int(L, 1, "shard_count", o.shard_count);
    o.lock_retry_ms = opt_int(L, 1, "lock_retry_ms", o.lock_retry_ms);
    o.connect_timeout_ms = opt_int(L, 1, "connect_timeout_ms", o.connect_timeout_ms);
    o.statement_timeout_ms = opt_int(L, 1, "statement_timeout_ms", o.statement_timeout_ms);
    lua_getfield(L, 1, "delete_published");
    o.delete_published = lua_toboolean(L, -1);
    lua_pop(L, 1);

    lr = lua_newuserdata(L, sizeof *lr);
    lr->r = NULL;
    lr->running = 0;
    lr->closing = 0;
    qx_setmetatable(L, QX_RELAY_MT);
    if (qx_relay_new(&lr->r, &o, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

static void push_result(lua_State *L, const qx_relay_result *res)
{
    lua_createtable(L, 0, 7);
    lua_pushboolean(L, res->leader), lua_setfield(L, -2, "leader");
    lua_pushinteger(L, res->claimed), lua_setfield(L, -2, "claimed");
    lua_pushinteger(L, res->published), lua_setfield(L, -2, "published");
    lua_pushinteger(L, res->duplicates), lua_setfield(L, -2, "duplicates");
    lua_pushinteger(L, res->failed), lua_setfield(L, -2, "failed");
    lua_pushinteger(L, res->dead_lettered), lua_setfield(L, -2, "dead_lettered");
    lua_pushinteger(L, res->held), lua_setfield(L, -2, "held");
}

/* relay:run_once() -> { leader, claimed, published, duplicates, failed, dead_lettered, held }
 *                   | nil, err */
static int l_run_once(lua_State *L)
{
    lrelay *lr = check_relay(L);
    qx_relay_result res;
    qx_error err;
    if (lr->running)
        return luaL_error(L, "relay is running");
    if (qx_relay_run_once(lr->r, &res, &err) != QX_OK)
        return qx_push_error(L, &err);
    push_result(L, &res);
    return 1;
}

typedef struct run_ctx {
    lua_State *L;
    int fn;      /* stack index of on_batch, 0 when none */
    int raised;  /* on_batch raised: its error is at the top of the stack */
} run_ctx;

/* Called by the core on this same thread between batches. */
static int on_batch(void *ud, const qx_relay_result *res, const qx_error *err)
{
    run_ctx *ctx = ud;
    lua_State *L = ctx->L;
    int stop;
    if (ctx->fn == 0)
        return 0;
    lua_pushvalue(L, ctx->fn);
    push_result(L, res);
    if (err != NULL) {
        qx_push_error(L, err); /* pushes nil, err */
        lua_remove(L, -2);
    } else {
        lua_pushnil(L);
    }
    if (lua_pcall(L, 2, 1, 0) != 0) {
        ctx->raised = 1; /* keep the error on the stack for run() to raise */
        return 1;
    }
    stop = lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1);
    lua_pop(L, 1);
    return stop;
}

/* relay:run{ on_batch = fn(result, err) -> false to stop, handle_signals = bool } -> true.
 * Blocks until stop() (from on_batch), on_batch returning false, or with handle_signals a
 * SIGTERM/SIGINT; the batch in flight is finished first. */
static int l_run(lua_State *L)
{
    lrelay *lr = check_relay(L);
    run_ctx ctx;
    qx_error err;
    int handle_signals = 0;

    if (lr->running)
        return luaL_error(L, "relay is already running");
    ctx.L = L;
    ctx.fn = 0;
    ctx.raised = 0;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        lua_getfield(L, 2, "handle_signals");
        handle_signals = lua_toboolean(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, 2, "on_batch");
        if (!lua_isnil(L, -1)) {
            luaL_checktype(L, -1, LUA_TFUNCTION);
            ctx.fn = lua_gettop(L);
        } else {
            lua_pop(L, 1);
        }
    }
    lr->running = 1;
    qx_relay_run(lr->r, on_batch, &ctx, handle_signals, &err);
    lr->running = 0;
    if (lr->closing) { /* closed from on_batch */
        qx_relay_free(lr->r);
        lr->r = NULL;
    }
    if (ctx.raised)
        return lua_error(L);
    lua_pushboolean(L, 1);
    return 1;
}

/* relay:stop(): run() returns after the batch in flight */
static int l_stop(lua_State *L)
{
    lrelay *lr = check_relay(L);
    qx_relay_stop(lr->r);
    return 0;
}

static int l_stats(lua_State *L)
{
    lrelay *lr = check_relay(L);
    qx_relay_stats s;
    qx_relay_stats_get(lr->r, &s);
    lua_createtable(L, 0, 16);
    qx_pushint64(L, s.batches), lua_setfield(L, -2, "batches");
    qx_pushint64(L, s.claimed), lua_setfield(L, -2, "claimed");
    qx_pushint64(L, s.published), lua_setfield(L, -2, "published");
    qx_pushint64(L, s.duplicates), lua_setfield(L, -2, "duplicates");
    qx_pushint64(L, s.failed), lua_setfield(L, -2, "failed");
    qx_pushint64(L, s.dead_lettered), lua_setfield(L, -2, "dead_lettered");
    qx_pushint64(L, s.held), lua_setfield(L, -2, "held");
    qx_pushint64(L, s.errors), lua_setfield(L, -2, "errors");
    qx_pushint64(L, s.leader_changes), lua_setfield(L, -2, "leader_changes");
    lua_pushboolean(L, s.leader), lua_setfield(L, -2, "leader");
    lua_pushboolean(L, s.running), lua_setfield(L, -2, "running");
    lua_pushnumber(L, s.last_batch_at), lua_setfield(L, -2, "last_batch_at");
    lua_pushnumber(L, s.started_at), lua_setfield(L, -2, "started_at");
    lua_createtable(L, 0, 2);
    lua_pushstring(L, qx_nats_state_name(s.nats_state)), lua_setfield(L, -2, "state");
    qx_pushint64(L, s.nats_reconnects), lua_setfield(L, -2, "reconnects");
    lua_setfield(L, -2, "nats");
    if (s.last_error[0] != '\0')
        lua_pushstring(L, s.last_error), lua_setfield(L, -2, "last_error");
    return 1;
}

/* close, __gc and __close: ends the relay's session (and its leadership); twice is harmless */
static int l_close(lua_State *L)
{
    lrelay *lr = luaL_checkudata(L, 1, QX_RELAY_MT);
    if (lr->r == NULL || lr->closing)
        return 0;
    if (lr->running) {
        lr->closing = 1;
        qx_relay_stop(lr->r);
        return 0;
    }
    qx_relay_free(lr->r);
    lr->r = NULL;
    return 0;
}

static int l_tostring(lua_State *L)
{
    lrelay *lr = luaL_checkudata(L, 1, QX_RELAY_MT);
    lua_pushfstring(L, "qx.relay (%s%p)", lr->r == NULL ? "closed, " : "", (void *)lr);
    return 1;
}

static const luaL_Reg methods[] = {
    { "run_once", l_run_once },
    { "run", l_run },
    { "stop", l_stop },
    { "stats", l_stats },
    { "close", l_close },
    { NULL, NULL }
};

void qx_open_relay(lua_State *L)
{
    qx_register_type(L, QX_RELAY_MT, methods, l_close, l_tostring);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "relay");
}
