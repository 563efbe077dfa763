/* The relay userdata: core.relay{...}, run_once, run, stop, stats, close. */
#include <string.h>

#include "binding.h"

#define QX_RELAY_MT "qx.relay"

typedef struct lrelay {
    qx_relay *r;  /* NULL once closed */
    int running;  /* inside run(): close() only stops it, run() frees it on the way out */
    int closing;
} lrelay;

static int l_run_once(lua_State *L);
static int l_run(lua_State *L);
static int l_stop(lua_State *L);
static int l_stats(lua_State *L);

static const luaL_Reg methods[] = {
    { "run_once", l_run_once },
    { "run", l_run },
    { "stop", l_stop },
    { "stats", l_stats },
    { NULL, NULL }
};

/* close, __gc and __close: ends the relay's session (and its leadership). Inside run() (from
 * on_batch) it only stops it, and run() frees it on the way out. */
static void relay_close(lua_State *L, void *ud)
{
    lrelay *lr = ud;
    (void)L;
    if (lr->closing)
        return;
    if (lr->running) {
        lr->closing = 1;
        qx_relay_stop(lr->r);
        return;
    }
    qx_relay_free(lr->r);
    lr->r = NULL;
}

static const qx_type relay_type = {
    QX_RELAY_MT, methods, "close", relay_close, NULL, "closed", NULL
};

static lrelay *check_relay(lua_State *L)
{
    lrelay *lr = qx_check_open(L, 1, &relay_type, "relay is closed");
    if (lr->closing)
        luaL_error(L, "relay is closed");
    return lr;
}

static const char *const relay_options[] = {
    "conninfo", "nats", "subject_prefix", "channel", "batch_size", "max_in_flight",
    "ack_timeout_ms", "max_attempts", "base_delay_ms", "max_delay_ms", "poll_interval_ms",
    "idle_interval_ms", "shard_id", "shard_count", "lock_retry_ms", "connect_timeout_ms",
    "statement_timeout_ms", "delete_published", NULL
};

/* An integer option; the core checks the ranges (and says which). */
static int opt_int(lua_State *L, const char *name, int dflt)
{
    return (int)qx_opt_int(L, 1, "core.relay", name, -0x7fffffffLL, 0x7fffffff, dflt);
}

/* core.relay{ conninfo, nats, subject_prefix, channel, batch_size, max_in_flight,
 *             ack_timeout_ms, max_attempts, base_delay_ms, max_delay_ms, poll_interval_ms,
 *             idle_interval_ms, shard_id, shard_count, lock_retry_ms, connect_timeout_ms,
 *             statement_timeout_ms, delete_published } -> relay | nil, err */
static int l_new(lua_State *L)
{
    static const char what[] = "core.relay";
    qx_relay_options o;
    qx_error err;
    lrelay *lr;

    qx_opt_check(L, 1, what, relay_options);
    qx_relay_options_init(&o);
    o.conninfo = qx_opt_string(L, 1, what, "conninfo", NULL, 0);
    lua_getfield(L, 1, "nats");
    o.nats = qx_check_nats(L, -1); /* the relay retains it */
    lua_pop(L, 1);
    o.subject_prefix = qx_opt_string(L, 1, what, "subject_prefix", o.subject_prefix, 0);
    o.channel = qx_opt_string(L, 1, what, "channel", o.channel, 0);
    o.batch_size = opt_int(L, "batch_size", o.batch_size);
    o.max_in_flight = opt_int(L, "max_in_flight", o.max_in_flight);
    o.ack_timeout_ms = opt_int(L, "ack_timeout_ms", o.ack_timeout_ms);
    o.max_attempts = opt_int(L, "max_attempts", o.max_attempts);
    o.base_delay_ms = opt_int(L, "base_delay_ms", o.base_delay_ms);
    o.max_delay_ms = opt_int(L, "max_delay_ms", o.max_delay_ms);
    o.poll_interval_ms = opt_int(L, "poll_interval_ms", o.poll_interval_ms);
    o.idle_interval_ms = opt_int(L, "idle_interval_ms", o.idle_interval_ms);
    o.shard_id = opt_int(L, "shard_id", o.shard_id);
    o.shard_count = opt_int(L, "shard_count", o.shard_count);
    o.lock_retry_ms = opt_int(L, "lock_retry_ms", o.lock_retry_ms);
    o.connect_timeout_ms = opt_int(L, "connect_timeout_ms", o.connect_timeout_ms);
    o.statement_timeout_ms = opt_int(L, "statement_timeout_ms", o.statement_timeout_ms);
    o.delete_published = qx_opt_bool(L, 1, what, "delete_published", 0);

    lr = qx_new_closed(L, &relay_type, sizeof *lr);
    if (qx_relay_new(&lr->r, &o, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

static void push_result(lua_State *L, const qx_relay_result *res)
{
    int i;
    lua_createtable(L, 0, 9);
    lua_pushboolean(L, res->leader), lua_setfield(L, -2, "leader");
    lua_pushboolean(L, res->database), lua_setfield(L, -2, "database");
    lua_pushboolean(L, res->lock_lost), lua_setfield(L, -2, "lock_lost");
    lua_pushinteger(L, res->claimed), lua_setfield(L, -2, "claimed");
    lua_pushinteger(L, res->published), lua_setfield(L, -2, "published");
    lua_pushinteger(L, res->duplicates), lua_setfield(L, -2, "duplicates");
    lua_pushinteger(L, res->failed), lua_setfield(L, -2, "failed");
    lua_pushinteger(L, res->dead_lettered), lua_setfield(L, -2, "dead_lettered");
    lua_pushinteger(L, res->held), lua_setfield(L, -2, "held");
    lua_pushinteger(L, res->retried), lua_setfield(L, -2, "retried");
    lua_createtable(L, res->nfailures, 0);
    for (i = 0; i < res->nfailures; i++) {
        const qx_relay_failure *f = &res->failures[i];
        lua_createtable(L, 0, 4);
        lua_pushstring(L, f->event_id), lua_setfield(L, -2, "event_id");
        lua_pushstring(L, f->error), lua_setfield(L, -2, "error");
        lua_pushboolean(L, f->counted), lua_setfield(L, -2, "counted");
        lua_pushboolean(L, f->dead), lua_setfield(L, -2, "dead");
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "failures");
}

/* relay:run_once() -> { leader, database, lock_lost, claimed, published, duplicates, failed,
 *                      retried, dead_lettered, held,
 *                      failures = { { event_id, error, counted, dead }, ... } } | nil, err */
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
        static const char *const run_options[] = { "on_batch", "handle_signals", NULL };
        qx_opt_check(L, 2, "relay:run", run_options);
        handle_signals = qx_opt_bool(L, 2, "relay:run", "handle_signals", 0);
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
    qx_pushint64(L, s.retried), lua_setfield(L, -2, "retried");
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

void qx_open_relay(lua_State *L)
{
    qx_register_type(L, &relay_type);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "relay");
}
