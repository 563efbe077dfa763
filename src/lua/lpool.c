/* The pool userdata: core.pool{...}, pool:acquire(), pool:stats(), pool:close(). */
#include "binding.h"

typedef struct lpool {
    qx_pool *p; /* NULL once closed */
} lpool;

static lpool *check_pool(lua_State *L)
{
    lpool *lp = luaL_checkudata(L, 1, QX_POOL_MT);
    if (lp->p == NULL)
        luaL_error(L, "pool is closed");
    return lp;
}

static int opt_int_field(lua_State *L, int t, const char *name, int dflt)
{
    long long v;
    int r;
    lua_getfield(L, t, name);
    if (lua_isnil(L, -1)) {
        r = dflt;
    } else if (qx_isinteger(L, -1, &v) && v >= 0 && v <= 0x7fffffff) {
        r = (int)v;
    } else {
        return luaL_error(L, "option '%s' must be a non-negative integer", name);
    }
    lua_pop(L, 1);
    return r;
}

int qx_pool_new_lua(lua_State *L)
{
    qx_pool_options o;
    qx_error err;
    lpool *lp;

    luaL_checktype(L, 1, LUA_TTABLE);
    qx_pool_options_init(&o);
    lua_getfield(L, 1, "conninfo");
    o.conninfo = luaL_checkstring(L, -1); /* stays alive in the options table */
    lua_pop(L, 1);
    o.size = opt_int_field(L, 1, "size", o.size);
    o.acquire_timeout_ms = opt_int_field(L, 1, "acquire_timeout_ms", o.acquire_timeout_ms);
    o.recycle_ms = opt_int_field(L, 1, "recycle_ms", o.recycle_ms);
    o.connect_timeout_ms = opt_int_field(L, 1, "connect_timeout_ms", o.connect_timeout_ms);
    lua_getfield(L, 1, "init_sql");
    o.init_sql = luaL_optstring(L, -1, NULL); /* stays alive in the options table */
    lua_pop(L, 1);

    /* closed first, then acquired: an error in between leaks nothing */
    lp = lua_newuserdata(L, sizeof *lp);
    lp->p = NULL;
    qx_setmetatable(L, QX_POOL_MT);
    if (qx_pool_new(&lp->p, &o, &err) != QX_OK)
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
    if (qx_pool_acquire(lp->p, slot, &err) != QX_OK)
        return qx_push_error(L, &err);
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

/* __gc and close are the same; closing twice is harmless. Leased connections keep the core pool
 * alive until they are released. */
static int l_close(lua_State *L)
{
    lpool *lp = luaL_checkudata(L, 1, QX_POOL_MT);
    if (lp->p != NULL) {
        qx_pool_free(lp->p);
        lp->p = NULL;
    }
    return 0;
}

static int l_tostring(lua_State *L)
{
    lpool *lp = luaL_checkudata(L, 1, QX_POOL_MT);
    lua_pushfstring(L, "qx.pool (%s%p)", lp->p == NULL ? "closed, " : "", (void *)lp);
    return 1;
}

static const luaL_Reg methods[] = {
    { "acquire", l_acquire },
    { "stats", l_stats },
    { "close", l_close },
    { NULL, NULL }
};

int qx_open_pool(lua_State *L)
{
    qx_register_type(L, QX_POOL_MT, methods, l_close, l_tostring);
    return 0;
}
