/*
 * JSON text from Lua values, with numbers kept exact.
 *
 * Decoding stays with lua-cjson. Encoding is here because the lua-cjson that distributions ship
 * (2.1.0) writes numbers with at most 14 significant digits: 2^53 becomes 9.007199254741e+15
 * and 0.1 + 0.2 becomes 0.3, silently, in every payload, envelope and cursor. This encoder writes
 * integers exactly and floats with the fewest digits that read back to the same double.
 *
 * The shapes follow lua-cjson's: a table whose keys are exactly 1..n is an array, any other table
 * an object (number keys become strings), an empty table is {}; qx.null / cjson.null is null.
 * Functions, userdata, threads, NaN and infinities cannot be encoded, nor tables nested deeper
 * than QX_JSON_MAX_DEPTH (which also catches cycles). Nothing here raises a Lua error, so the
 * malloc'd buffer is always freed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"

#define QX_JSON_MAX_DEPTH 1000

typedef struct jbuf {
    char *p;            /* inline, or malloc'd once the text outgrows it */
    size_t len, cap;
    const char *error; /* first failure, static text or the msg buffer */
    char msg[160];
    char inline_buf[1024]; /* most events and envelopes fit: no malloc, realloc and free */
} jbuf;

/* Makes room for n more bytes (and a NUL) by growing the buffer. */
static int grow(jbuf *b, size_t n)
{
    size_t cap = b->cap * 2;
    char *p;
    while (cap < b->len + n + 1)
        cap *= 2;
    if (b->p == b->inline_buf) {
        p = malloc(cap);
        if (p != NULL)
            memcpy(p, b->p, b->len);
    } else {
        p = realloc(b->p, cap);
    }
    if (p == NULL) {
        b->error = "out of memory";
        return 0;
    }
    b->p = p;
    b->cap = cap;
    return 1;
}

/* Room for n more bytes (and a NUL) in the buffer: a compare, inlined, unless it must grow. */
static inline int reserve(jbuf *b, size_t n)
{
    return b->len + n + 1 <= b->cap || grow(b, n);
}

static inline int put(jbuf *b, const char *s, size_t n)
{
    if (!reserve(b, n))
        return 0;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 1;
}

#define PUTS(b, lit) put((b), (lit), sizeof(lit) - 1)

/* 1 for the bytes a JSON string cannot hold as they are: control characters, '"' and '\\' */
static const unsigned char needs_escape[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
};

/* Word-at-a-time tests (the classic bit tricks): nonzero when some byte of w is below 0x20, or
 * equals c. They may report a byte that is not there only after a real one (a borrow travels
 * upwards), which the byte loop that follows sorts out; they never miss one. */
#define ONES UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)
static inline uint64_t has_byte_below_space(uint64_t w)
{
    return (w - ONES * 0x20) & ~w & HIGHS;
}
static inline uint64_t has_byte(uint64_t w, unsigned char c)
{
    uint64_t x = w ^ (ONES * c);
    return (x - ONES) & ~x & HIGHS;
}

/* Payloads are mostly plain text: the runs between escapes are found eight bytes at a time
 * (then one table look-up a byte) and copied whole, and the buffer grows at most once for the
 * common case of no escape at all. */
static int put_string(jbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, run = 0;
    if (!reserve(b, n + 2)) /* the text and its quotes, unless something needs escaping */
        return 0;
    b->p[b->len++] = '"';
    for (;;) {
        const char *esc;
        char code[7];
        /* eight bytes at a time while none of them needs escaping, then byte by byte */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, u + i, 8);
            if (has_byte_below_space(w) | has_byte(w, '"') | has_byte(w, '\\'))
                break;
            i += 8;
        }
        while (i < n && !needs_escape[u[i]])
            i++;
        if (!put(b, s + run, i - run))
            return 0;
        if (i == n)
            break;
        switch (u[i]) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            code[0] = '\\', code[1] = 'u', code[2] = '0', code[3] = '0';
            code[4] = hex[u[i] >> 4], code[5] = hex[u[i] & 15], code[6] = '\0';
            esc = code;
        }
        if (!put(b, esc, strlen(esc)))
            return 0;
        run = ++i;
    }
    return PUTS(b, "\"");
}

/* The shortest of %.15g..%.17g that reads back as d. */
static void format_double(char out[32], double d)
{
    int prec;
    for (prec = 15; prec <= 17; prec++) {
        snprintf(out, 32, "%.*g", prec, d);
        if (strtod(out, NULL) == d)
            return;
    }
}

/* Writes the decimal text of v; snprintf costs more than the rest of a small object. */
static int put_int(jbuf *b, long long v)
{
    char tmp[24];
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    int n = (int)sizeof tmp;
    do {
        tmp[--n] = (char)('0' + u % 10);
        u /= 10;
    } while (u != 0);
    if (v < 0)
        tmp[--n] = '-';
    return put(b, tmp + n, sizeof tmp - (size_t)n);
}

static int put_number(jbuf *b, lua_State *L, int idx)
{
    char num[32];
    long long iv;
#if LUA_VERSION_NUM >= 503
    if (lua_isinteger(L, idx))
        return put_int(b, (long long)lua_tointeger(L, idx));
#endif
    {
        double d = (double)lua_tonumber(L, idx);
        if (isnan(d) || isinf(d)) {
            b->error = "cannot encode NaN or infinity as JSON";
            return 0;
        }
        /* an integral double within 2^53 is written as an integer, as LuaJIT users expect */
        if (d == floor(d) && fabs(d) <= 9007199254740992.0 && qx_isinteger(L, idx, &iv))
            return put_int(b, iv);
        format_double(num, d);
    }
    return put(b, num, strlen(num));
}

static int encode(jbuf *b, lua_State *L, int idx, int depth);

/* 1..n with nothing else: an array of n; otherwise -1 (object). */
static long long array_length(lua_State *L, int idx)
{
    long long n = 0, max = 0, k;
    /* a border of 0 means t[1] is nil: an object (or {}), without looking at every key */
    if (qx_rawlen(L, idx) == 0)
        return -1;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER || !qx_isinteger(L, -1, &k) || k < 1) {
            lua_pop(L, 1);
            return -1;
        }
        n++;
        if (k > max)
            max = k;
    }
    return (n > 0 && max == n) ? n : -1;
}

static int encode_table(jbuf *b, lua_State *L, int idx, int depth)
{
    long long n, i;
    int first = 1;

    if (depth > QX_JSON_MAX_DEPTH) {
        b->error = "tables nested too deep for JSON (a cycle?)";
        return 0;
    }
    if (!lua_checkstack(L, 4)) {
        b->error = "out of Lua stack";
        return 0;
    }
    n = array_length(L, idx);
    if (n > 0) {
        if (!PUTS(b, "["))
            return 0;
        for (i = 1; i <= n; i++) {
            int ok;
            lua_rawgeti(L, idx, (int)i);
            ok = (i == 1 || PUTS(b, ",")) && encode(b, L, lua_gettop(L), depth + 1);
            lua_pop(L, 1);
            if (!ok)
                return 0;
        }
        return PUTS(b, "]");
    }
    if (!PUTS(b, "{"))
        return 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        int ok = first || PUTS(b, ",");
        first = 0;
        if (ok) {
            if (lua_type(L, -2) == LUA_TSTRING) {
                size_t klen;
                const char *k = lua_tolstring(L, -2, &klen);
                ok = put_string(b, k, klen);
            } else if (lua_type(L, -2) == LUA_TNUMBER) {
                ok = PUTS(b, "\"") && put_number(b, L, lua_gettop(L) - 1) && PUTS(b, "\"");
            } else {
                snprintf(b->msg, sizeof b->msg, "cannot encode a %s key as JSON",
                         lua_typename(L, lua_type(L, -2)));
                b->error = b->msg;
                ok = 0;
            }
        }
        ok = ok && PUTS(b, ":") && encode(b, L, lua_gettop(L), depth + 1);
        lua_pop(L, 1);
        if (!ok) {
            lua_pop(L, 1);
            return 0;
        }
    }
    return PUTS(b, "}");
}

static int encode(jbuf *b, lua_State *L, int idx, int depth)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        return PUTS(b, "null");
    case LUA_TBOOLEAN:
        return lua_toboolean(L, idx) ? PUTS(b, "true") : PUTS(b, "false");
    case LUA_TNUMBER:
        return put_number(b, L, idx);
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        return put_string(b, s, n);
    }
    case LUA_TTABLE:
        return encode_table(b, L, idx, depth);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL)
            return PUTS(b, "null");
        /* fall through */
    default:
        snprintf(b->msg, sizeof b->msg, "cannot encode a %s as JSON",
                 lua_typename(L, lua_type(L, idx)));
        b->error = b->msg;
        return 0;
    }
}

int qx_json_push(lua_State *L, int idx, const char **error)
{
    jbuf b;
    int ok;
    b.p = b.inline_buf;
    b.len = 0;
    b.cap = sizeof b.inline_buf;
    b.error = NULL;
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    ok = encode(&b, L, idx, 0);
    if (ok) {
        lua_pushlstring(L, b.p, b.len);
    } else {
        /* copy the reason out before the buffer (and b.msg with it) goes */
        lua_pushstring(L, b.error != NULL ? b.error : "cannot encode as JSON");
        *error = lua_tostring(L, -1);
    }
    if (b.p != b.inline_buf)
        free(b.p);
    return ok;
}

/* What core.json_rows is told about the rows it writes (see l_json_rows). */
#define MAX_ROW_FIELDS 16
#define MAX_ROW_KEY 64 /* the JSON of a field's key ("name":), written once per call */

typedef struct row_shape {
    int fields;      /* stack index of the first field name; nfields of them follow */
    int nfields;
    char keys[MAX_ROW_FIELDS + 1][MAX_ROW_KEY]; /* "name": of each field, then of the item */
    size_t keylen[MAX_ROW_FIELDS + 1];
    int item;        /* stack index of the item's key */
    int omit;        /* stack index of the table of item keys to leave out, 0 for none */
    const char *prefix; /* item keys starting with it are left out too; NULL for none */
    size_t prefix_len;
} row_shape;

/* One item: the table's string keys and their values, less those the shape leaves out. */
static int put_item(jbuf *b, lua_State *L, int idx, int depth, const row_shape *sh)
{
    int first = 1;
    if (!lua_checkstack(L, 4)) {
        b->error = "out of Lua stack";
        return 0;
    }
    if (!PUTS(b, "{"))
        return 0;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        size_t klen;
        const char *k;
        int ok;
        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pop(L, 1);
            continue;
        }
        k = lua_tolstring(L, -2, &klen);
        if (sh->prefix != NULL && klen >= sh->prefix_len &&
            memcmp(k, sh->prefix, sh->prefix_len) == 0) {
            lua_pop(L, 1);
            continue;
        }
        if (sh->omit != 0) {
            int skip;
            lua_pushvalue(L, -2);
            lua_rawget(L, sh->omit);
            skip = lua_toboolean(L, -1);
            lua_pop(L, 1);
            if (skip) {
                lua_pop(L, 1);
                continue;
            }
        }
        ok = (first || PUTS(b, ",")) && put_string(b, k, klen) && PUTS(b, ":") &&
             encode(b, L, lua_gettop(L), depth + 1);
        first = 0;
        lua_pop(L, 1);
        if (!ok) {
            lua_pop(L, 1);
            return 0;
        }
    }
    return PUTS(b, "}");
}

static int put_key(jbuf *b, const row_shape *sh, int k)
{
    return put(b, sh->keys[k], sh->keylen[k]);
}

/* Writes "name": of the key at idx into slot k of the shape; 0 when it does not fit. */
static int shape_key(lua_State *L, row_shape *sh, int idx, int k)
{
    jbuf kb;
    int ok;
    size_t len;
    const char *name = lua_tolstring(L, idx, &len);
    kb.p = kb.inline_buf;
    kb.len = 0;
    kb.cap = sizeof kb.inline_buf;
    kb.error = NULL;
    ok = put_string(&kb, name, len) && PUTS(&kb, ":") && kb.len <= MAX_ROW_KEY;
    if (ok) {
        memcpy(sh->keys[k], kb.p, kb.len);
        sh->keylen[k] = kb.len;
    }
    if (kb.p != kb.inline_buf)
        free(kb.p);
    return ok;
}

/* The rows of one group: its field values at g .. g + nfields - 1 (the last one an integer that
 * counts up from row to row), its array of items at g + nfields. */
static int put_group(jbuf *b, lua_State *L, int g, const row_shape *sh, int *first)
{
    int items = g + sh->nfields, f;
    long long count, i, n;
    if (!qx_isinteger(L, items - 1, &count) || lua_type(L, items) != LUA_TTABLE) {
        b->error = "expected groups of field values (the last an integer) and a list of items";
        return 0;
    }
    n = (long long)qx_rawlen(L, items);
    for (i = 1; i <= n; i++, count++) {
        int ok;
        lua_rawgeti(L, items, (int)i);
        if (lua_type(L, -1) != LUA_TTABLE) {
            lua_pop(L, 1);
            b->error = "an item is not a table";
            return 0;
        }
        ok = (*first || PUTS(b, ",")) && PUTS(b, "{");
        /* the values sit as deep as in a table of rows of tables */
        for (f = 0; ok && f < sh->nfields - 1; f++)
            ok = (f == 0 || PUTS(b, ",")) && put_key(b, sh, f) &&
                 encode(b, L, g + f, 2);
        ok = ok && (sh->nfields == 1 || PUTS(b, ",")) &&
             put_key(b, sh, sh->nfields - 1) && put_int(b, count) && PUTS(b, ",") &&
             put_key(b, sh, sh->nfields) && put_item(b, L, lua_gettop(L), 2, sh) && PUTS(b, "}");
        *first = 0;
        lua_pop(L, 1);
        if (!ok)
            return 0;
    }
    return 1;
}

/* core.json_rows(shape, v1, ..., vk, items, ...) or core.json_rows(shape, list) with the same
 * values in one array -> text | nil, err
 * shape = { fields = { name1, ..., namek }, item = name, omit = { key = true, ... }?,
 *           omit_prefix = "..."? }
 * The JSON array of one object per item of each group: the group's k fields (the last one an
 * integer counting up from item to item), then the item itself (its string keys, less those in
 * omit and those starting with omit_prefix). Written in one pass, so that no row or item table
 * is made for it in Lua. */
static int l_json_rows(lua_State *L)
{
    int nargs, listed, first = 1, ok, g, group, k;
    row_shape sh;
    jbuf b;

    luaL_checktype(L, 1, LUA_TTABLE);
    listed = lua_gettop(L) == 2 && lua_type(L, 2) == LUA_TTABLE;
    nargs = listed ? (int)qx_rawlen(L, 2) : lua_gettop(L) - 1;
    luaL_checkstack(L, 2 * MAX_ROW_FIELDS + 16, "json_rows");
    lua_getfield(L, 1, "fields");
    if (!lua_istable(L, -1))
        return luaL_error(L, "json_rows: shape.fields must be a list of names");
    sh.nfields = (int)qx_rawlen(L, -1);
    if (sh.nfields < 1 || sh.nfields > MAX_ROW_FIELDS)
        return luaL_error(L, "json_rows: shape.fields must hold 1 to %d names", MAX_ROW_FIELDS);
    sh.fields = lua_gettop(L) + 1;
    for (k = 1; k <= sh.nfields; k++) {
        lua_rawgeti(L, sh.fields - 1, k);
        if (lua_type(L, -1) != LUA_TSTRING || !shape_key(L, &sh, -1, k - 1))
            return luaL_error(L, "json_rows: shape.fields must be a list of short names");
    }
    lua_getfield(L, 1, "item");
    if (lua_type(L, -1) != LUA_TSTRING || !shape_key(L, &sh, -1, sh.nfields))
        return luaL_error(L, "json_rows: shape.item must be a short name");
    sh.item = lua_gettop(L);
    lua_getfield(L, 1, "omit");
    sh.omit = lua_istable(L, -1) ? lua_gettop(L) : 0;
    lua_getfield(L, 1, "omit_prefix");
    sh.prefix = lua_tolstring(L, -1, &sh.prefix_len);
    if (sh.prefix != NULL && sh.prefix_len == 0)
        sh.prefix = NULL;
    group = sh.nfields + 1;
    if (nargs % group != 0)
        return luaL_error(L, "json_rows: expected groups of %d field values and a list of items",
                          sh.nfields);
    b.p = b.inline_buf;
    b.len = 0;
    b.cap = sizeof b.inline_buf;
    b.error = NULL;
    ok = PUTS(&b, "[");
    for (g = 0; ok && g + group <= nargs; g += group) {
        if (listed) {
            int top; /* room checked above: the buffer must not be left by a raise */
            for (k = 1; k <= group; k++)
                lua_rawgeti(L, 2, g + k);
            top = lua_gettop(L);
            ok = put_group(&b, L, top - group + 1, &sh, &first);
            lua_pop(L, group);
        } else {
            ok = put_group(&b, L, 2 + g, &sh, &first);
        }
    }
    ok = ok && PUTS(&b, "]");
    if (ok)
        lua_pushlstring(L, b.p, b.len);
    else
        lua_pushstring(L, b.error != NULL ? b.error : "cannot encode as JSON");
    if (b.p != b.inline_buf)
        free(b.p);
    if (ok)
        return 1;
    return qx_push_error_msg(L, "invalid", lua_tostring(L, -1));
}

/* core.json_encode(value) -> text | nil, err */
static int l_json_encode(lua_State *L)
{
    const char *why = NULL;
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    if (qx_json_push(L, 1, &why))
        return 1;
    return qx_push_error_msg(L, "invalid", why);
}

void qx_open_json(lua_State *L)
{
    lua_pushcfunction(L, l_json_encode);
    lua_setfield(L, -2, "json_encode");
    lua_pushcfunction(L, l_json_rows);
    lua_setfield(L, -2, "json_rows");
}
