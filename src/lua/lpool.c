/* The pool userdata: core.pool{...}, pool:acquire(), pool:stats(), pool:close(). With
 * shared = name, the pool is the process's pool of that name (src/core/pool.c) and close drops
 * only this state's hold on it. */
#include "binding.h"

typedef struct lpool {
    qx_pool *p; /* NULL once closed */
} lpool;

static int l_acquire(lua_State *L);
static int l_stats(lua_State *L);

static const luaL_Reg methods[] = {
    { "acquire", l_acquire },
    { "stats", l_stats },
    { NULL, NULL }
};

/* close, __gc and __close. Leased connections keep the core pool alive until they are
 * released. */
static void pool_close(lua_State *L, void *ud)
{
    lpool *lp = ud;
    (void)L;
    qx_pool_free(lp->p);
    lp->p = NULL;
}

static const qx_type pool_type = {
    QX_POOL_MT, methods, "close", pool_close, NULL, "closed", NULL
};

static lpool *check_pool(lua_State *L)
{
    lpool *lp = luaL_checkudata(L, 1, QX_POOL_MT);
    if (lp->p == NULL)
        luaL_error(L, "pool is closed");
    return lp;
}

static const char *const pool_options[] = {
    "conninfo", "size", "acquire_timeout_ms", "recycle_ms", "connect_timeout_ms", "init_sql",
    "shared", NULL
};

int qx_pool_new_lua(lua_State *L)
{
    static const char what[] = "core.pool";
    qx_pool_options o;
    qx_error err;
    lpool *lp;
    const char *shared;

    qx_opt_check(L, 1, what, pool_options);
    qx_pool_options_init(&o);
    o.conninfo = qx_opt_string(L, 1, what, "conninfo", NULL, 1);
    o.size = (int)qx_opt_int(L, 1, what, "size", 0, 0x7fffffff, o.size);
    o.acquire_timeout_ms = (int)qx_opt_int(L, 1, what, "acquire_timeout_ms", 0, 0x7fffffff,
                                           o.acquire_timeout_ms);
    o.recycle_ms = (int)qx_opt_int(L, 1, what, "recycle_ms", 0, 0x7fffffff, o.recycle_ms);
    o.connect_timeout_ms = (int)qx_opt_int(L, 1, what, "connect_timeout_ms", 0, 0x7fffffff,
                                           o.connect_timeout_ms);
    o.init_sql = qx_opt_string(L, 1, what, "init_sql", NULL, 0);
    shared = qx_opt_string(L, 1, what, "shared", NULL, 0);

    lp = qx_new_closed(L, &pool_type, sizeof *lp);
    if ((shared != NULL ? qx_pool_shared(&lp->p, shared, &o, &err)
                        : qx_pool_new(&lp->p, &o, &err)) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

static int l_acquire(lua_State *L)
{
    lpool *lp = check_pool(L);
    qx_error err;
    /* the connection userdata first, then the lease: a failed allocation cannot leak a
     * pooled connection */
    qx_conn **slot = qx_conn_push(L, lp->p, 1);
    if (qx_pool_acquire(lp->p, slot, &err) != QX_OK) {
        qx_conn_unpush(L, -1);
        return qx_push_error(L, &err);
    }
    return 1;
}

static int l_stats(lua_State *L)
{
    lpool *lp = check_pool(L);
    qx_pool_stats s;
    qx_pool_stats_get(lp->p, &s);
    lua_createtable(L, 0, 7);
    lua_pushinteger(L, s.size), lua_setfield(L, -2, "size");
    lua_pushinteger(L, s.open), lua_setfield(L, -2, "open");
    lua_pushinteger(L, s.idle), lua_setfield(L, -2, "idle");
    lua_pushinteger(L, s.in_use), lua_setfield(L, -2, "in_use");
    lua_pushinteger(L, s.waiting), lua_setfield(L, -2, "waiting");
    qx_pushint64(L, s.created), lua_setfield(L, -2, "created");
    qx_pushint64(L, s.replaced), lua_setfield(L, -2, "replaced");
    return 1;
}

int qx_open_pool(lua_State *L)
{
    qx_register_type(L, &pool_type);
    return 0;
}
