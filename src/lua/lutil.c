/* What every binding file shares: option tables read one way, and one close and one tostring
 * for every userdata type. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "binding.h"

/* ---- option tables ---------------------------------------------------------------------- */

/* Raises msg at level 2: the error points at the code that called the binding. */
static int raise_at_caller(lua_State *L, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int raise_at_caller(lua_State *L, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    luaL_where(L, 2);
    lua_pushstring(L, msg);
    lua_concat(L, 2);
    return lua_error(L);
}

void qx_opt_check(lua_State *L, int idx, const char *what, const char *const *known)
{
    luaL_Buffer b;
    int i;
    if (lua_type(L, idx) != LUA_TTABLE)
        raise_at_caller(L, "%s: expected a table of options, got %s", what, luaL_typename(L, idx));
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        int found = 0;
        for (i = 0; key != NULL && known[i] != NULL && !found; i++)
            found = strcmp(key, known[i]) == 0;
        lua_pop(L, 1);
        if (!found) {
            luaL_buffinit(L, &b);
            for (i = 0; known[i] != NULL; i++) {
                if (i > 0)
                    luaL_addstring(&b, ", ");
                luaL_addstring(&b, known[i]);
            }
            luaL_pushresult(&b);
            if (key != NULL)
                raise_at_caller(L, "%s: unknown option '%s' (known: %s)", what, key,
                                lua_tostring(L, -1));
            raise_at_caller(L, "%s: option keys must be strings (known: %s)", what,
                            lua_tostring(L, -1));
        }
    }
}

long long qx_opt_int(lua_State *L, int idx, const char *what, const char *name, long long lo,
                     long long hi, long long dflt)
{
    long long v = dflt;
    lua_getfield(L, idx, name);
    if (!lua_isnil(L, -1) && (!qx_isinteger(L, -1, &v) || v < lo || v > hi))
        raise_at_caller(L, "%s: option '%s' must be an integer from %lld to %lld", what, name,
                        lo, hi);
    lua_pop(L, 1);
    return v;
}

const char *qx_opt_string(lua_State *L, int idx, const char *what, const char *name,
                          const char *dflt, int required)
{
    const char *s = dflt;
    lua_getfield(L, idx, name);
    if (lua_isnil(L, -1)) {
        if (required)
            raise_at_caller(L, "%s: option '%s' is required (a string)", what, name);
    } else if (lua_type(L, -1) != LUA_TSTRING) {
        raise_at_caller(L, "%s: option '%s' must be a string, got %s", what, name,
                        luaL_typename(L, -1));
    } else {
        s = lua_tostring(L, -1); /* stays alive in the options table */
    }
    lua_pop(L, 1);
    return s;
}

int qx_opt_bool(lua_State *L, int idx, const char *what, const char *name, int dflt)
{
    int v = dflt;
    lua_getfield(L, idx, name);
    if (lua_type(L, -1) == LUA_TBOOLEAN)
        v = lua_toboolean(L, -1);
    else if (!lua_isnil(L, -1))
        raise_at_caller(L, "%s: option '%s' must be a boolean, got %s", what, name,
                        luaL_typename(L, -1));
    lua_pop(L, 1);
    return v;
}

/* ---- userdata types --------------------------------------------------------------------- */

/* __gc, __close and the close method: upvalue 1 is the type. */
static int type_close(lua_State *L)
{
    const qx_type *t = lua_touserdata(L, lua_upvalueindex(1));
    void **ud = luaL_checkudata(L, 1, t->name);
    if (*ud != NULL)
        t->close(L, ud);
    return 0;
}

static int type_tostring(lua_State *L)
{
    const qx_type *t = lua_touserdata(L, lua_upvalueindex(1));
    void **ud = luaL_checkudata(L, 1, t->name);
    char desc[256];
    if (*ud == NULL) {
        lua_pushfstring(L, "%s (%s, %p)", t->name, t->closed_word, (void *)ud);
    } else if (t->describe != NULL) {
        desc[0] = '\0';
        t->describe(ud, desc, sizeof desc);
        lua_pushfstring(L, "%s (%s, %p)", t->name, desc, (void *)ud);
    } else {
        lua_pushfstring(L, "%s (%p)", t->name, (void *)ud);
    }
    return 1;
}

void qx_register_type(lua_State *L, const qx_type *t)
{
    if (luaL_newmetatable(L, t->name)) {
        qx_newlib(L, t->methods);
        if (t->close_method != NULL) {
            lua_pushlightuserdata(L, (void *)t);
            lua_pushcclosure(L, type_close, 1);
            lua_setfield(L, -2, t->close_method);
        }
        if (t->index != NULL)
            lua_pushcclosure(L, t->index, 1);
        lua_setfield(L, -2, "__index");
        lua_pushlightuserdata(L, (void *)t);
        lua_pushcclosure(L, type_close, 1);
        lua_pushvalue(L, -1);
        lua_setfield(L, -3, "__gc");
        lua_setfield(L, -2, "__close");
        lua_pushlightuserdata(L, (void *)t);
        lua_pushcclosure(L, type_tostring, 1);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
}

void qx_register_hot_type(lua_State *L, const qx_type *t, const void *key)
{
    const luaL_Reg *m;
    qx_register_type(L, t);
    luaL_getmetatable(L, t->name);
    lua_getfield(L, -1, "__index");
    for (m = t->methods; m->name != NULL; m++) {
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, m->func, 1);
        lua_setfield(L, -2, m->name);
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, (void *)key);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
}

void *qx_to_hot(lua_State *L, const char *tname)
{
    void *ud = lua_touserdata(L, 1);
    if (ud != NULL && lua_getmetatable(L, 1)) {
        int same = lua_rawequal(L, -1, lua_upvalueindex(1));
        lua_pop(L, 1);
        if (same)
            return ud;
    }
    return luaL_checkudata(L, 1, tname);
}

int qx_hold(lua_State *L, int parent)
{
    lua_pushvalue(L, parent);
#if LUA_VERSION_NUM >= 504
    lua_setiuservalue(L, -2, 1);
    return LUA_NOREF;
#else
    return luaL_ref(L, LUA_REGISTRYINDEX);
#endif
}

void qx_unhold(lua_State *L, int ud, int *ref)
{
#if LUA_VERSION_NUM >= 504
    if (ud < 0 && ud > LUA_REGISTRYINDEX)
        ud = lua_gettop(L) + ud + 1;
    lua_pushnil(L);
    lua_setiuservalue(L, ud, 1);
#else
    (void)ud;
#endif
    if (*ref != LUA_NOREF) {
        luaL_unref(L, LUA_REGISTRYINDEX, *ref);
        *ref = LUA_NOREF;
    }
}

void *qx_new_closed(lua_State *L, const qx_type *t, size_t size)
{
    void *ud = lua_newuserdata(L, size);
    memset(ud, 0, size);
    qx_setmetatable(L, t->name);
    return ud;
}

void *qx_check_open(lua_State *L, int idx, const qx_type *t, const char *closed_msg)
{
    void **ud = luaL_checkudata(L, idx, t->name);
    if (*ud == NULL)
        luaL_error(L, "%s", closed_msg);
    return ud;
}
