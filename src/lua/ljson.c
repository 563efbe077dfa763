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
#include "internal.h"

#define QX_JSON_MAX_DEPTH 1000

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

/* One stored event: the event table's string keys and their values, less the routing fields
 * (aggregate_type, aggregate_id) and "_" keys, which are not part of the stored event. */
static int put_stored_event(jbuf *b, lua_State *L, int idx, int depth)
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
        if (k[0] == '_' || (klen == 14 && memcmp(k, "aggregate_type", 14) == 0) ||
            (klen == 12 && memcmp(k, "aggregate_id", 12) == 0)) {
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

/* The rows of one aggregate's events for the event store's append insert: its type and id (text)
 * at ti and ai, the sequence of its first event at si, the array of events at ei. */
static int put_event_group(jbuf *b, lua_State *L, int ti, int ai, int si, int ei, int *first)
{
    size_t tlen, alen;
    const char *type, *agg;
    long long seq, i, n;
    if (lua_type(L, ti) != LUA_TSTRING || lua_type(L, ai) != LUA_TSTRING ||
        !qx_isinteger(L, si, &seq) || lua_type(L, ei) != LUA_TTABLE) {
        b->error = "expected groups of aggregate type, id, first sequence and events";
        return 0;
    }
    type = lua_tolstring(L, ti, &tlen);
    agg = lua_tolstring(L, ai, &alen);
    n = (long long)qx_rawlen(L, ei);
    for (i = 1; i <= n; i++, seq++) {
        int ok;
        lua_rawgeti(L, ei, (int)i);
        if (lua_type(L, -1) != LUA_TTABLE) {
            lua_pop(L, 1);
            b->error = "an event is not a table";
            return 0;
        }
        /* the event's values sit as deep as in a table of rows of tables */
        ok = (*first || PUTS(b, ",")) && PUTS(b, "{\"type\":") && put_string(b, type, tlen) &&
             PUTS(b, ",\"agg\":") && put_string(b, agg, alen) && PUTS(b, ",\"seq\":") &&
             put_int(b, seq) && PUTS(b, ",\"event\":") &&
             put_stored_event(b, L, lua_gettop(L), 2) && PUTS(b, "}");
        *first = 0;
        lua_pop(L, 1);
        if (!ok)
            return 0;
    }
    return 1;
}

/* core.json_event_rows(type, id, first_seq, events, ...) or core.json_event_rows(list) with the
 * same values in one array (for many aggregates) -> text | nil, err
 * The JSON array of the event store's append rows, [{"type":..,"agg":..,"seq":..,"event":{..}},
 * ...], sequences counting up within each aggregate's events. Written in one pass, so that no
 * row or event table is made for it in Lua. */
static int l_json_event_rows(lua_State *L)
{
    int nargs = lua_gettop(L), listed = nargs == 1 && lua_type(L, 1) == LUA_TTABLE, first = 1;
    int ok, g;
    jbuf b;
    if (listed)
        nargs = (int)qx_rawlen(L, 1);
    if (nargs % 4 != 0)
        return luaL_error(L, "json_event_rows: expected groups of type, id, sequence, events");
    jbuf_init(&b);
    ok = PUTS(&b, "[");
    for (g = 1; ok && g + 3 <= nargs; g += 4) {
        if (listed) {
            int k, top;
            luaL_checkstack(L, 8, "json_event_rows");
            for (k = 0; k < 4; k++)
                lua_rawgeti(L, 1, g + k);
            top = lua_gettop(L);
            ok = put_event_group(&b, L, top - 3, top - 2, top - 1, top, &first);
            lua_pop(L, 4);
        } else {
            ok = put_event_group(&b, L, g, g + 1, g + 2, g + 3, &first);
        }
    }
    ok = ok && PUTS(&b, "]");
    if (ok)
        lua_pushlstring(L, b.out.p, b.out.len);
    else
        lua_pushstring(L, b.error != NULL ? b.error : "cannot encode as JSON");
    qx_buf_free(&b.out);
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
    lua_pushcfunction(L, l_json_event_rows);
    lua_setfield(L, -2, "json_event_rows");
}
