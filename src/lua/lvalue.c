/* Value conversion between Lua and PostgreSQL's text format. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"

static const char JSON_DECODE_KEY[] = "qx.json.decode";

#define NUM_SCRATCH 32

/* Decoding uses a private lua-cjson instance, so the application's own cjson settings do not
 * change ours. (Encoding is ljson.c's: exact numbers.) */
void qx_json_init(lua_State *L)
{
    int top = lua_gettop(L);
    lua_getglobal(L, "require");
    lua_pushstring(L, "cjson");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "new");
    lua_call(L, 0, 1);
    lua_getfield(L, -1, "decode");
    lua_setfield(L, LUA_REGISTRYINDEX, JSON_DECODE_KEY);
    lua_settop(L, top);
}

int qx_params_from_stack(lua_State *L, qx_params *out, int first, int n)
{
    char *block, *scratch;
    int anchor, i, nstrings = 0;
    char msg[256];

    out->n = n;
    if (n == 0) { /* BEGIN, COMMIT, ...: nothing to keep alive */
        out->values = NULL;
        out->lengths = NULL;
        lua_pushnil(L);
        return 1;
    }
    /* The anchor is the block of pointers, lengths and number texts; a table parameter turns it
     * into a table that also holds the JSON texts. */
    block = lua_newuserdata(L, (size_t)n * (sizeof(char *) + sizeof(int) + NUM_SCRATCH));
    anchor = lua_gettop(L);
    out->values = (const char **)(void *)block;
    out->lengths = (int *)(void *)(block + sizeof(char *) * (size_t)n);
    scratch = block + (sizeof(char *) + sizeof(int)) * (size_t)n;

    for (i = 0; i < n; i++) {
        int idx = first + i;
        char *num = scratch + (size_t)i * NUM_SCRATCH;
        long long iv;
        size_t len;
        const char *s;

        switch (lua_type(L, idx)) {
        case LUA_TNIL:
            out->values[i] = NULL;
            out->lengths[i] = 0;
            break;
        case LUA_TLIGHTUSERDATA:
            if (lua_touserdata(L, idx) != NULL)
                goto unsupported;
            out->values[i] = NULL; /* qx.null */
            out->lengths[i] = 0;
            break;
        case LUA_TBOOLEAN:
            out->values[i] = lua_toboolean(L, idx) ? "true" : "false";
            out->lengths[i] = (int)strlen(out->values[i]);
            break;
        case LUA_TNUMBER:
            if (qx_isinteger(L, idx, &iv)) {
                snprintf(num, NUM_SCRATCH, "%lld", iv);
            } else {
                double d = (double)lua_tonumber(L, idx);
                if (isnan(d))
                    strcpy(num, "NaN");
                else if (isinf(d))
                    strcpy(num, d > 0 ? "Infinity" : "-Infinity");
                else
                    snprintf(num, NUM_SCRATCH, "%.17g", d);
            }
            out->values[i] = num;
            out->lengths[i] = (int)strlen(num);
            break;
        case LUA_TSTRING:
            s = lua_tolstring(L, idx, &len);
            if (memchr(s, '\0', len) != NULL) {
                snprintf(msg, sizeof msg, "parameter $%d contains a NUL byte", i + 1);
                goto fail;
            }
            out->values[i] = s;
            out->lengths[i] = (int)len;
            break;
        case LUA_TTABLE:
            if (nstrings == 0) {
                lua_createtable(L, 2, 0);
                lua_pushvalue(L, anchor);
                lua_rawseti(L, -2, ++nstrings);
                lua_replace(L, anchor);
            }
            {
                const char *why = NULL;
                if (!qx_json_push(L, idx, &why)) {
                    snprintf(msg, sizeof msg, "parameter $%d cannot be sent as JSON: %s", i + 1,
                             why);
                    goto fail;
                }
            }
            s = lua_tolstring(L, -1, &len);
            out->values[i] = s;
            out->lengths[i] = (int)len;
            lua_rawseti(L, anchor, ++nstrings); /* keeps the text alive */
            break;
        default:
        unsupported:
            snprintf(msg, sizeof msg, "parameter $%d: cannot send a %s to PostgreSQL", i + 1,
                     luaL_typename(L, idx));
            goto fail;
        }
    }
    return 1;

fail:
    lua_settop(L, anchor - 1);
    qx_push_error_msg(L, "invalid", msg);
    return 0;
}

static void push_value(lua_State *L, const qx_result *r, int row, int col, unsigned int type)
{
    const char *v = qx_result_value(r, row, col);
    switch (type) {
    case QX_OID_INT2:
    case QX_OID_INT4:
    case QX_OID_INT8:
    case QX_OID_OID:
        qx_pushint64(L, strtoll(v, NULL, 10));
        break;
    case QX_OID_FLOAT4:
    case QX_OID_FLOAT8:
        lua_pushnumber(L, (lua_Number)strtod(v, NULL));
        break;
    case QX_OID_BOOL:
        lua_pushboolean(L, v[0] == 't');
        break;
    case QX_OID_JSON:
    case QX_OID_JSONB:
        lua_getfield(L, LUA_REGISTRYINDEX, JSON_DECODE_KEY);
        lua_pushlstring(L, v, (size_t)qx_result_length(r, row, col));
        if (lua_pcall(L, 1, 1, 0) != 0) {
            lua_pop(L, 1); /* the server sent it, so it parses; keep the text if not */
            lua_pushlstring(L, v, (size_t)qx_result_length(r, row, col));
        }
        break;
    case QX_OID_BYTEA: {
        unsigned char *bytes = NULL;
        size_t len = 0;
        if (qx_bytea_decode(&bytes, &len, v, NULL) == QX_OK) {
            lua_pushlstring(L, (const char *)bytes, len);
            qx_free(bytes);
        } else {
            lua_pushlstring(L, v, (size_t)qx_result_length(r, row, col));
        }
        break;
    }
    default: /* numeric keeps its digits; text, uuid, timestamptz, ... as text */
        lua_pushlstring(L, v, (size_t)qx_result_length(r, row, col));
        break;
    }
}

void qx_push_rows(lua_State *L, const qx_result *r)
{
    int nrows = qx_result_nrows(r), ncols = qx_result_ncols(r), row, col;
    int base = lua_gettop(L), names;
    unsigned int *typ;

    luaL_checkstack(L, ncols + 8, "too many columns");
    typ = lua_newuserdata(L, sizeof *typ * (size_t)(ncols > 0 ? ncols : 1));
    names = lua_gettop(L) + 1;
    for (col = 0; col < ncols; col++) {
        lua_pushstring(L, qx_result_colname(r, col));
        typ[col] = qx_result_coltype(r, col);
    }
    lua_createtable(L, nrows, 0);
    for (row = 0; row < nrows; row++) {
        lua_createtable(L, 0, ncols);
        for (col = 0; col < ncols; col++) {
            lua_pushvalue(L, names + col);
            if (qx_result_isnull(r, row, col))
                lua_pushlightuserdata(L, NULL);
            else
                push_value(L, r, row, col, typ[col]);
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, row + 1);
    }
    /* leave only the rows table above base */
    lua_replace(L, base + 1);
    lua_settop(L, base + 1);
}
