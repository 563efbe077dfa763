/*
 * JSON text from Lua values, with numbers kept exact.
 *
 * The lua-cjson that distributions ship (2.1.0) writes numbers with at most 14 significant
 * digits: 2^53 becomes 9.007199254741e+15 and 0.1 + 0.2 becomes 0.3, silently, in every payload,
 * envelope and cursor. This encoder writes integers exactly and floats with the fewest digits
 * that read back to the same double; on Lua 5.4 an integral float keeps a fraction (150.0,
 * -0.0), so that the decoder (ljsondec.c) gives it back as a float, not as an integer.
 *
 * The shapes follow lua-cjson's: a table whose keys are exactly 1..n is an array, any other table
 * an object (number keys become strings), an empty table is {}; qx.null / cjson.null is null.
 * Functions, userdata, threads, NaN and infinities cannot be encoded, nor documents of more than
 * QX_JSON_MAX_DEPTH levels, counted from the root of the text written (which also catches
 * cycles): the decoder reads as many, so whatever is written reads back. Nothing here raises a Lua error, so the
 * malloc'd buffer is always freed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"
#include "internal.h"

typedef struct jbuf {
    qx_buf out;            /* starts in inline_buf: most events and envelopes fit, no malloc */
    const char *error;     /* first failure, static text or the msg buffer */
    char msg[160];
    char inline_buf[1024];
} jbuf;

static void jbuf_init(jbuf *b)
{
    qx_buf_init(&b->out, b->inline_buf, sizeof b->inline_buf);
    b->error = NULL;
}

/* Room for n more bytes (and a NUL) in the buffer: a compare, inlined, unless it must grow. */
static inline int reserve(jbuf *b, size_t n)
{
    if (qx_buf_reserve(&b->out, n))
        return 1;
    b->error = "out of memory";
    return 0;
}

static inline int put(jbuf *b, const char *s, size_t n)
{
    if (qx_buf_append(&b->out, s, n))
        return 1;
    b->error = "out of memory";
    return 0;
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
    b->out.p[b->out.len++] = '"';
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
#if LUA_VERSION_NUM >= 503
        /* a float stays a float: an integral one is written with a fraction, in full up to 2^63
         * (PostgreSQL's jsonb writes 1e+15 back as 1000000000000000, an integer) */
        if (d == floor(d)) {
            if (fabs(d) < 9223372036854775808.0)
                snprintf(num, sizeof num, "%.1f", d);
            else
                format_double(num, d); /* an exponent: beyond 64 bits, read as a float */
            return put(b, num, strlen(num));
        }
        (void)iv;
#else
        /* an integral double within 2^53 is written as an integer, as LuaJIT users expect */
        if (d == floor(d) && fabs(d) <= 9007199254740992.0 && qx_isinteger(L, idx, &iv))
            return put_int(b, iv);
#endif
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

    if (depth >= QX_JSON_MAX_DEPTH) {
        b->error = "nested deeper than " QX_JSON_MAX_DEPTH_TEXT " levels (a cycle?)";
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
    jbuf_init(&b);
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    ok = encode(&b, L, idx, 0);
    if (ok) {
        lua_pushlstring(L, b.out.p, b.out.len);
    } else {
        /* copy the reason out before the buffer (and b.msg with it) goes */
        lua_pushstring(L, b.error != NULL ? b.error : "cannot encode as JSON");
        *error = lua_tostring(L, -1);
    }
    qx_buf_free(&b.out);
    return ok;
}

/* What core.json_rows is told about the rows it writes (see l_json_rows). */
#define MAX_ROW_FIELDS 16
#define MAX_ROW_OMIT 16
#define MAX_ROW_KEY 64

/* A shape made by core.json_shape: everything core.json_rows needs, written once. A plain
 * userdata (nothing to free, nothing referenced). */
typedef struct row_shape {
    int nfields;
    char keys[MAX_ROW_FIELDS + 1][MAX_ROW_KEY]; /* "name": of each field, then of the item */
    size_t keylen[MAX_ROW_FIELDS + 1];
    char names[MAX_ROW_FIELDS][MAX_ROW_KEY];    /* each field's name itself (json_object) */
    int nomit;
    char omit[MAX_ROW_OMIT][MAX_ROW_KEY];       /* item keys left out */
    size_t omitlen[MAX_ROW_OMIT];
    char prefix[MAX_ROW_KEY];                   /* item keys starting with it are left out */
    size_t prefix_len;
} row_shape;

static const char SHAPE_MT_KEY = 's';

static int left_out(const row_shape *sh, const char *k, size_t klen)
{
    int i;
    if (sh->prefix_len > 0 && klen >= sh->prefix_len && k[0] == sh->prefix[0] &&
        memcmp(k, sh->prefix, sh->prefix_len) == 0)
        return 1;
    for (i = 0; i < sh->nomit; i++)
        if (klen == sh->omitlen[i] && k[0] == sh->omit[i][0] && memcmp(k, sh->omit[i], klen) == 0)
            return 1;
    return 0;
}

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
        if (klen > 0 && left_out(sh, k, klen)) {
            lua_pop(L, 1);
            continue;
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
            ok = (f == 0 || PUTS(b, ",")) && put(b, sh->keys[f], sh->keylen[f]) &&
                 encode(b, L, g + f, 2);
        f = sh->nfields - 1;
        ok = ok && (f == 0 || PUTS(b, ",")) && put(b, sh->keys[f], sh->keylen[f]) &&
             put_int(b, count) && PUTS(b, ",") &&
             put(b, sh->keys[f + 1], sh->keylen[f + 1]) &&
             put_item(b, L, lua_gettop(L), 2, sh) && PUTS(b, "}");
        *first = 0;
        lua_pop(L, 1);
        if (!ok)
            return 0;
    }
    return 1;
}

/* The key at idx as JSON ("name":) into out; 0 when it is not a string or too long. */
static int shape_key(lua_State *L, int idx, char *out, size_t *outlen)
{
    jbuf kb;
    int ok;
    size_t len;
    const char *name;
    if (lua_type(L, idx) != LUA_TSTRING)
        return 0;
    name = lua_tolstring(L, idx, &len);
    jbuf_init(&kb);
    ok = len < MAX_ROW_KEY && put_string(&kb, name, len) && PUTS(&kb, ":") &&
         kb.out.len <= MAX_ROW_KEY;
    if (ok) {
        memcpy(out, kb.out.p, kb.out.len);
        *outlen = kb.out.len;
    }
    qx_buf_free(&kb.out);
    return ok;
}

/* core.json_shape{ fields = { name1, ..., namek }, item = name, omit = { key, ... }?,
 *                  omit_prefix = "..."? } -> shape for core.json_rows */
static int l_json_shape(lua_State *L)
{
    row_shape *sh;
    int k, n;
    luaL_checktype(L, 1, LUA_TTABLE);
    sh = lua_newuserdata(L, sizeof *sh);
    memset(sh, 0, sizeof *sh);
    lua_pushlightuserdata(L, (void *)&SHAPE_MT_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_setmetatable(L, -2);
    lua_getfield(L, 1, "fields");
    if (!lua_istable(L, -1))
        return luaL_error(L, "json_shape: fields must be a list of names");
    n = (int)qx_rawlen(L, -1);
    if (n < 1 || n > MAX_ROW_FIELDS)
        return luaL_error(L, "json_shape: fields must hold 1 to %d names", MAX_ROW_FIELDS);
    sh->nfields = n;
    for (k = 0; k < n; k++) {
        lua_rawgeti(L, -1, k + 1);
        if (!shape_key(L, -1, sh->keys[k], &sh->keylen[k]))
            return luaL_error(L, "json_shape: fields must be a list of short names");
        /* shape_key took it: a string shorter than MAX_ROW_KEY */
        snprintf(sh->names[k], MAX_ROW_KEY, "%s", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "item");
    if (!shape_key(L, -1, sh->keys[n], &sh->keylen[n]))
        return luaL_error(L, "json_shape: item must be a short name");
    lua_pop(L, 1);
    lua_getfield(L, 1, "omit");
    if (!lua_isnil(L, -1)) {
        if (!lua_istable(L, -1) || (n = (int)qx_rawlen(L, -1)) > MAX_ROW_OMIT)
            return luaL_error(L, "json_shape: omit must be a list of at most %d keys",
                              MAX_ROW_OMIT);
        for (k = 0; k < n; k++) {
            size_t len;
            const char *key;
            lua_rawgeti(L, -1, k + 1);
            if (lua_type(L, -1) != LUA_TSTRING)
                return luaL_error(L, "json_shape: omit must be a list of short keys");
            key = lua_tolstring(L, -1, &len);
            if (len == 0 || len >= MAX_ROW_KEY)
                return luaL_error(L, "json_shape: omit must be a list of short keys");
            memcpy(sh->omit[k], key, len);
            sh->omitlen[k] = len;
            lua_pop(L, 1);
        }
        sh->nomit = n;
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "omit_prefix");
    if (!lua_isnil(L, -1)) {
        size_t len = 0;
        const char *p = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &len) : NULL;
        if (p == NULL || len >= MAX_ROW_KEY)
            return luaL_error(L, "json_shape: omit_prefix must be a short string");
        memcpy(sh->prefix, p, len);
        sh->prefix_len = len;
    }
    lua_pop(L, 1);
    return 1;
}

/* What json_rows and json_object return: the text written (ok), else nil and the reason as an
 * "invalid" error; the buffer freed either way. */
static int push_text(lua_State *L, jbuf *b, int ok)
{
    if (ok)
        lua_pushlstring(L, b->out.p, b->out.len);
    else
        lua_pushstring(L, b->error != NULL ? b->error : "cannot encode as JSON");
    qx_buf_free(&b->out);
    if (ok)
        return 1;
    return qx_push_error_msg(L, "invalid", lua_tostring(L, -1));
}

/* The shape at idx, when it is one made by json_shape (its metatable the upvalue), else NULL. */
static const row_shape *check_shape(lua_State *L, int idx)
{
    const row_shape *sh = lua_touserdata(L, idx);
    int same = 0;
    if (sh != NULL && lua_getmetatable(L, idx)) {
        same = lua_rawequal(L, -1, lua_upvalueindex(1));
        lua_pop(L, 1);
    }
    return same ? sh : NULL;
}

/* core.json_rows(shape, v1, ..., vk, items, ...) or core.json_rows(shape, list) with the same
 * values in one array -> text | nil, err
 * The JSON array of one object per item of each group: the group's k fields of the shape (the
 * last one an integer counting up from item to item), then the item itself (its string keys,
 * less those the shape leaves out). Written in one pass, so that no row or item table is made
 * for it in Lua. */
static int l_json_rows(lua_State *L)
{
    int nargs, listed, first = 1, ok, g, group, k;
    const row_shape *sh = check_shape(L, 1);
    jbuf b;

    if (sh == NULL)
        return luaL_argerror(L, 1, "a shape made by json_shape expected");
    listed = lua_gettop(L) == 2 && lua_type(L, 2) == LUA_TTABLE;
    nargs = listed ? (int)qx_rawlen(L, 2) : lua_gettop(L) - 1;
    group = sh->nfields + 1;
    if (nargs % group != 0)
        return luaL_error(L, "json_rows: expected groups of %d field values and a list of items",
                          sh->nfields);
    luaL_checkstack(L, group + 16, "json_rows"); /* before the buffer: it must not be left */
    jbuf_init(&b);
    ok = PUTS(&b, "[");
    for (g = 0; ok && g + group <= nargs; g += group) {
        if (listed) {
            int top;
            for (k = 1; k <= group; k++)
                lua_rawgeti(L, 2, g + k);
            top = lua_gettop(L);
            ok = put_group(&b, L, top - group + 1, sh, &first);
            lua_pop(L, group);
        } else {
            ok = put_group(&b, L, 2 + g, sh, &first);
        }
    }
    ok = ok && PUTS(&b, "]");
    return push_text(L, &b, ok);
}

/* core.json_object(shape, t) -> text | nil, err
 * One object written from the table t itself: the shape's fields, each t's own value of that
 * name (absent or qx.null: null), then the item: t's string keys less those the shape leaves
 * out. An event's envelope is this (its metadata, then its payload fields), encoded without the
 * envelope's and the payload's tables. */
static int l_json_object(lua_State *L)
{
    const row_shape *sh = check_shape(L, 1);
    int f, ok;
    jbuf b;
    if (sh == NULL)
        return luaL_argerror(L, 1, "a shape made by json_shape expected");
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    /* the names go on the stack before the buffer is made: nothing after may raise and leave it */
    luaL_checkstack(L, sh->nfields + 16, "json_object");
    for (f = 0; f < sh->nfields; f++)
        lua_pushstring(L, sh->names[f]);
    jbuf_init(&b);
    ok = PUTS(&b, "{");
    for (f = 0; ok && f < sh->nfields; f++) {
        lua_pushvalue(L, 3 + f);
        lua_rawget(L, 2);
        ok = (f == 0 || PUTS(&b, ",")) && put(&b, sh->keys[f], sh->keylen[f]) &&
             encode(&b, L, lua_gettop(L), 1);
        lua_pop(L, 1);
    }
    f = sh->nfields;
    ok = ok && (f == 0 || PUTS(&b, ",")) && put(&b, sh->keys[f], sh->keylen[f]) &&
         put_item(&b, L, 2, 1, sh) && PUTS(&b, "}");
    return push_text(L, &b, ok);
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
    qx_open_json_decode(L);
    /* the shape metatable: known to json_rows as its upvalue, to json_shape by its key */
    lua_newtable(L);
    lua_pushliteral(L, "qx.json_shape");
    lua_setfield(L, -2, "__name");
    lua_pushlightuserdata(L, (void *)&SHAPE_MT_KEY);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, l_json_rows, 1);
    lua_setfield(L, -3, "json_rows");
    lua_pushcclosure(L, l_json_object, 1);
    lua_setfield(L, -2, "json_object");
    lua_pushcfunction(L, l_json_shape);
    lua_setfield(L, -2, "json_shape");
}
