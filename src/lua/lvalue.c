/* Value conversion between Lua and PostgreSQL's text format. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"

/* Decimal text of v into buf (at least 21 bytes); returns the length. */
static int format_int(char *buf, long long v)
{
    char tmp[24];
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    int n = 0, len = 0;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    if (v < 0)
        buf[len++] = '-';
    while (n > 0)
        buf[len++] = tmp[--n];
    buf[len] = '\0';
    return len;
}

int qx_param_text(lua_State *L, int idx, int pos, const char **value, int *length, char *num,
                  int *pushed, char *msg, size_t msgsize)
{
    long long iv;
    size_t len;
    const char *s;

    *pushed = 0;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        *value = NULL;
        *length = 0;
        return 1;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) != NULL)
            break;
        *value = NULL; /* qx.null */
        *length = 0;
        return 1;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx))
            *value = "true", *length = 4;
        else
            *value = "false", *length = 5;
        return 1;
    case LUA_TNUMBER:
        if (qx_isinteger(L, idx, &iv)) {
            *length = format_int(num, iv);
        } else {
            double d = (double)lua_tonumber(L, idx);
            if (isnan(d))
                strcpy(num, "NaN");
            else if (isinf(d))
                strcpy(num, d > 0 ? "Infinity" : "-Infinity");
            else
                snprintf(num, QX_NUM_SCRATCH, "%.17g", d);
            *length = (int)strlen(num);
        }
        *value = num;
        return 1;
    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &len);
        if (memchr(s, '\0', len) != NULL) {
            snprintf(msg, msgsize, "parameter $%d contains a NUL byte", pos);
            return 0;
        }
        *value = s;
        *length = (int)len;
        return 1;
    case LUA_TTABLE: {
        const char *why = NULL;
        luaL_checkstack(L, 2, "too many JSON parameters");
        if (!qx_json_push(L, idx, &why)) {
            snprintf(msg, msgsize, "parameter $%d cannot be sent as JSON: %s", pos, why);
            lua_pop(L, 1);
            return 0;
        }
        s = lua_tolstring(L, -1, &len);
        *value = s;
        *length = (int)len;
        *pushed = 1; /* the caller keeps the text on the stack */
        return 1;
    }
    default:
        break;
    }
    snprintf(msg, msgsize, "parameter $%d: cannot send a %s to PostgreSQL", pos,
             luaL_typename(L, idx));
    return 0;
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
    block = lua_newuserdata(L, (size_t)n * (sizeof(char *) + sizeof(int) + QX_NUM_SCRATCH));
    anchor = lua_gettop(L);
    out->values = (const char **)(void *)block;
    out->lengths = (int *)(void *)(block + sizeof(char *) * (size_t)n);
    scratch = block + (sizeof(char *) + sizeof(int)) * (size_t)n;

    for (i = 0; i < n; i++) {
        int pushed;
        if (!qx_param_text(L, first + i, i + 1, &out->values[i], &out->lengths[i],
                           scratch + (size_t)i * QX_NUM_SCRATCH, &pushed, msg, sizeof msg)) {
            lua_settop(L, anchor - 1);
            qx_push_error_msg(L, "invalid", msg);
            return 0;
        }
        if (pushed) {
            if (nstrings == 0) {
                lua_createtable(L, 2, 0);
                lua_pushvalue(L, anchor);
                lua_rawseti(L, -2, ++nstrings);
                lua_replace(L, anchor);
            }
            lua_rawseti(L, anchor, ++nstrings); /* keeps the text alive */
        }
    }
    return 1;
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
    case QX_OID_JSONB: {
        const char *why;
        /* the server sent it, so it parses; only a document deeper than qx writes (another
         * writer's) fails, and that is said, not handed over as its text */
        if (!qx_json_decode(L, v, (size_t)qx_result_length(r, row, col), &why))
            luaL_error(L, "column %s: %s", qx_result_colname(r, col), why);
        break;
    }
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

void qx_push_rows(lua_State *L, const qx_result *r, int skip_nulls, int max_rows,
                  qx_sealed_opener *op)
{
    int nrows = qx_result_nrows(r), ncols = qx_result_ncols(r), row, col;
    int base = lua_gettop(L), names;
    unsigned int local_types[64], *typ = local_types;

    if (max_rows >= 0 && nrows > max_rows)
        nrows = max_rows;
    luaL_checkstack(L, ncols + 8, "too many columns");
    if (ncols > (int)(sizeof local_types / sizeof local_types[0]))
        typ = lua_newuserdata(L, sizeof *typ * (size_t)ncols);
    names = lua_gettop(L) + 1;
    for (col = 0; col < ncols; col++) {
        lua_pushstring(L, qx_result_colname(r, col));
        typ[col] = qx_result_coltype(r, col);
    }
    lua_createtable(L, nrows, 0);
    for (row = 0; row < nrows; row++) {
        lua_createtable(L, 0, ncols);
        if (op != NULL)
            qx_sealed_opener_row(op, r, row);
        for (col = 0; col < ncols; col++) {
            if (qx_result_isnull(r, row, col)) {
                if (skip_nulls)
                    continue;
                lua_pushvalue(L, names + col);
                lua_pushlightuserdata(L, NULL);
            } else if (op != NULL && col == op->column &&
                       (typ[col] == QX_OID_JSON || typ[col] == QX_OID_JSONB)) {
                const char *why;
                lua_pushvalue(L, names + col);
                if (!qx_json_decode_sealed(L, qx_result_value(r, row, col),
                                           (size_t)qx_result_length(r, row, col), op, &why))
                    luaL_error(L, "column %s: %s", qx_result_colname(r, col), why);
            } else {
                lua_pushvalue(L, names + col);
                push_value(L, r, row, col, typ[col]);
            }
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, row + 1);
    }
    /* leave only the rows table above base */
    if (lua_gettop(L) > base + 1) {
        lua_replace(L, base + 1);
        lua_settop(L, base + 1);
    }
}
