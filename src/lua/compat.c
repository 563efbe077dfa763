/* Implementations behind compat.h. */
#include <math.h>
#include <stdio.h>

#include "compat.h"

#if LUA_VERSION_NUM < 502
void qx_setfuncs(lua_State *L, const luaL_Reg *l, int nup)
{
    luaL_checkstack(L, nup, "too many upvalues");
    for (; l->name != NULL; l++) {
        int i;
        for (i = 0; i < nup; i++)
            lua_pushvalue(L, -nup);
        lua_pushcclosure(L, l->func, nup);
        lua_setfield(L, -(nup + 2), l->name);
    }
    lua_pop(L, nup);
}

void *qx_testudata(lua_State *L, int i, const char *tname)
{
    void *p = lua_touserdata(L, i);
    if (p != NULL && lua_getmetatable(L, i)) {
        luaL_getmetatable(L, tname);
        if (!lua_rawequal(L, -1, -2))
            p = NULL;
        lua_pop(L, 2);
        return p;
    }
    return NULL;
}
#endif

void qx_setmetatable(lua_State *L, const char *tname)
{
    luaL_getmetatable(L, tname);
    lua_setmetatable(L, -2);
}

int qx_isinteger(lua_State *L, int i, long long *out)
{
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, i)) {
        *out = (long long)lua_tointeger(L, i);
        return 1;
    }
#endif
    if (lua_type(L, i) == LUA_TNUMBER) {
        lua_Number n = lua_tonumber(L, i);
        /* 2^63 is the first double that does not fit */
        if (n == floor(n) && n >= -9223372036854775808.0 && n < 9223372036854775808.0) {
            *out = (long long)n;
            return 1;
        }
    }
    return 0;
}

void qx_pushint64(lua_State *L, long long v)
{
#if LUA_VERSION_NUM >= 503
    lua_pushinteger(L, (lua_Integer)v);
#else
    if (v <= 9007199254740992LL && v >= -9007199254740992LL) {
        lua_pushnumber(L, (lua_Number)v);
    } else {
        char buf[24];
        snprintf(buf, sizeof buf, "%lld", v);
        lua_pushstring(L, buf);
    }
#endif
}
