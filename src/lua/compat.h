/* Lua 5.1/LuaJIT vs 5.4 differences, behind qx_-prefixed names (never redefining luaL_*). */
#ifndef QX_COMPAT_H
#define QX_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM >= 502
#define qx_rawlen(L, i) lua_rawlen((L), (i))
#define qx_setfuncs(L, l, nup) luaL_setfuncs((L), (l), (nup))
#define qx_testudata(L, i, tname) luaL_testudata((L), (i), (tname))
#else
#define qx_rawlen(L, i) lua_objlen((L), (i))
void qx_setfuncs(lua_State *L, const luaL_Reg *l, int nup);
void *qx_testudata(lua_State *L, int i, const char *tname);
#endif

/* Creates a table holding the functions of l (like luaL_newlib). */
#define qx_newlib(L, l) (lua_newtable(L), qx_setfuncs((L), (l), 0))

/* Sets the metatable tname (from the registry) on the value at the top of the stack. */
void qx_setmetatable(lua_State *L, const char *tname);

/* 1 when the value at i is a number with an exact integer value that fits lua_Integer. */
int qx_isinteger(lua_State *L, int i, long long *out);

/* Pushes a 64-bit integer. Lua 5.4 keeps it exact; LuaJIT's numbers are doubles, so a value
 * beyond +-2^53 is pushed as its decimal string instead of being rounded. */
void qx_pushint64(lua_State *L, long long v);

#endif
