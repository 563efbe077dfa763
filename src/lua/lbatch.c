/* A batch's statements read from Lua and its results made into Lua: what conn:batch and
 * wire:batch share, so both take and give the same shapes. */
#include <stdlib.h>

#include "binding.h"

int qx_batch_stmts(lua_State *L, int list, int n, qx_stmt *stmts)
{
    int i;
    for (i = 0; i < n; i++) {
        int k, np, t;
        long long v;
        qx_params params;

        lua_rawgeti(L, list, i + 1);
        t = lua_gettop(L);
        if (!lua_istable(L, t))
            return luaL_error(L, "batch statement %d is not a table", i + 1);
        lua_rawgeti(L, t, 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "batch statement %d has no SQL text", i + 1);
        stmts[i].sql = lua_tostring(L, -1); /* anchored by the statement table */
        lua_pop(L, 1);
        lua_getfield(L, t, "n");
        if (lua_isnil(L, -1))
            np = (int)qx_rawlen(L, t) - 1;
        else if (qx_isinteger(L, -1, &v) && v >= 0 && v < 65536)
            np = (int)v;
        else
            return luaL_error(L, "batch statement %d: n must be a parameter count", i + 1);
        lua_pop(L, 1);
        luaL_checkstack(L, np + 4, "too many parameters");
        for (k = 0; k < np; k++)
            lua_rawgeti(L, t, k + 2);
        if (!qx_params_from_stack(L, &params, t + 1, np)) {
            /* nil, err above the statement table and its values: move them down */
            lua_replace(L, t + 1);
            lua_replace(L, t);
            lua_settop(L, t + 1);
            lua_pushinteger(L, i + 1);
            return 0;
        }
        /* keep the anchor, drop the statement table and the copied values */
        lua_replace(L, t);
        lua_settop(L, t);
        stmts[i].nparams = np;
        stmts[i].values = params.values;
        stmts[i].lengths = params.lengths;
    }
    return 1;
}

void qx_push_batch_results(lua_State *L, qx_result **results, int n, int first, int list)
{
    int i;
    lua_createtable(L, n, 0);
    for (i = 0; i < n; i++) {
        int t, opening = 0;
        qx_sealed_opener op;
        if (i + 1 < first || results[i] == NULL) {
            lua_pushboolean(L, results[i] != NULL);
            lua_rawseti(L, -2, i + 1);
            qx_result_free(results[i]);
            results[i] = NULL;
            continue;
        }
        lua_createtable(L, 0, 3);
        t = lua_gettop(L);
        /* a statement's open_sealed: its rows' sealed values are opened as they are read */
        if (list != 0) {
            lua_rawgeti(L, list, i + 1);
            lua_getfield(L, -1, "open_sealed");
            if (!lua_isnil(L, -1))
                opening = qx_sealed_opener_init(L, &op, t + 2, results[i]);
        }
        qx_push_rows(L, results[i], 0, -1, opening ? &op : NULL);
        lua_setfield(L, t, "rows");
        if (opening)
            qx_sealed_opener_finish(L, &op, t);
        lua_settop(L, t);
        qx_pushint64(L, qx_result_affected(results[i]));
        lua_setfield(L, -2, "affected");
        lua_rawseti(L, -2, i + 1);
        qx_result_free(results[i]);
        results[i] = NULL;
    }
}
