/*
 * Lua values from JSON text: the one decoder behind every JSON value qx reads (json/jsonb
 * columns, envelopes of consumed messages, core.json_decode).
 *
 * It is the counterpart of ljson.c's encoder, so what qx writes reads back as the same value:
 * - on Lua 5.4 a number without fraction or exponent that fits in 64 bits is an integer, any
 *   other number a float (150.0 stays a float: the encoder writes it "150.0"); integers beyond
 *   64 bits, which another writer may send, become the nearest float, never an error;
 * - on LuaJIT every number is a double (integers beyond 2^53 become the nearest double);
 * - documents up to QX_JSON_MAX_DEPTH levels (the limit the encoder writes to), deeper ones are
 *   refused;
 * - shapes as lua-cjson gives them: objects and arrays as tables ({} for both when empty), null
 *   as qx.null (lightuserdata NULL, the same value as cjson.null).
 *
 * One pass, straight onto the Lua stack, no tree in between. Strings without escapes are pushed
 * from the text itself; escaped ones are unescaped into a scratch userdata (the garbage collector
 * frees it, so a Lua error raised by an allocation leaks nothing). Nothing here raises on bad
 * text: it is reported (the byte offset and why) for the caller to return.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "binding.h"

typedef struct jdec {
    const char *start, *p, *end;
    const char *error;     /* static text */
    int scratch_idx;       /* stack slot of the scratch userdata (nil until an escape is met) */
    char *scratch;         /* its bytes, scratch_cap of them */
    size_t scratch_cap;
    qx_sealed_opener *op;  /* opens the top-level object's sealed members, or NULL */
} jdec;

static int fail(jdec *d, const char *why)
{
    if (d->error == NULL)
        d->error = why;
    return 0;
}

static inline void skip_space(jdec *d)
{
    const char *p = d->p, *end = d->end;
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    d->p = p;
}

/* A scratch area of at least n bytes, kept on the stack at d->scratch_idx. */
static char *scratch(jdec *d, lua_State *L, size_t n)
{
    if (n > d->scratch_cap || d->scratch == NULL) {
        size_t cap = n < 256 ? 256 : n;
        d->scratch = lua_newuserdata(L, cap);
        d->scratch_cap = cap;
        lua_replace(L, d->scratch_idx);
    }
    return d->scratch;
}

/* The bytes that end a plain run inside a string: '"', '\\' and control characters. */
#define ONES UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)
static inline uint64_t stops(uint64_t w)
{
    uint64_t q = w ^ (ONES * '"'), b = w ^ (ONES * '\\');
    return (((w - ONES * 0x20) & ~w) | ((q - ONES) & ~q) | ((b - ONES) & ~b)) & HIGHS;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    int i;
    for (i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

static char *put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        *o++ = (char)cp;
    } else if (cp < 0x800) {
        *o++ = (char)(0xC0 | (cp >> 6));
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *o++ = (char)(0xE0 | (cp >> 12));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *o++ = (char)(0xF0 | (cp >> 18));
        *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    }
    return o;
}

/* The end of the plain run from q: the first '"', '\\' or control character, or end. */
static inline const char *plain_run(const char *q, const char *end)
{
    while (q + 8 <= end) {
        uint64_t w;
        memcpy(&w, q, 8);
        if (stops(w))
            break;
        q += 8;
    }
    while (q < end && *q != '"' && *q != '\\' && (unsigned char)*q >= 0x20)
        q++;
    return q;
}

/* d->p at the opening quote; pushes the string. */
static int parse_string(jdec *d, lua_State *L)
{
    const char *s = d->p + 1, *end = d->end, *q = plain_run(s, end);
    char *out, *o;

    if (q < end && *q == '"') { /* no escape: the text itself */
        lua_pushlstring(L, s, (size_t)(q - s));
        d->p = q + 1;
        return 1;
    }
    /* unescaping never lengthens the text, so what is left of it is room enough */
    out = scratch(d, L, (size_t)(end - s));
    memcpy(out, s, (size_t)(q - s));
    o = out + (q - s);
    for (;;) {
        unsigned char c;
        if (q >= end) {
            d->p = q;
            return fail(d, "unterminated string");
        }
        c = (unsigned char)*q;
        if (c == '"')
            break;
        if (c < 0x20) {
            d->p = q;
            return fail(d, "control character in a string");
        }
        if (c != '\\') {
            *o++ = (char)c;
            q++;
            continue;
        }
        if (q + 1 >= end) {
            d->p = q;
            return fail(d, "unterminated string");
        }
        switch (q[1]) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '/': *o++ = '/'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (end - q < 6 || !hex4(q + 2, &cp)) {
                d->p = q;
                return fail(d, "bad \\u escape");
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) { /* a surrogate pair makes one code point */
                if (end - q < 12 || q[6] != '\\' || q[7] != 'u' || !hex4(q + 8, &lo) ||
                    lo < 0xDC00 || lo > 0xDFFF) {
                    d->p = q;
                    return fail(d, "unpaired surrogate in a \\u escape");
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                q += 6;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                d->p = q;
                return fail(d, "unpaired surrogate in a \\u escape");
            }
            o = put_utf8(o, cp);
            q += 6;
            continue;
        }
        default:
            d->p = q;
            return fail(d, "bad escape");
        }
        q += 2;
    }
    lua_pushlstring(L, out, (size_t)(o - out));
    d->p = q + 1;
    return 1;
}

static const double POW10[] = { 1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22 };

static int parse_number(jdec *d, lua_State *L)
{
    const char *s = d->p, *q = s, *end = d->end;
    uint64_t m = 0;      /* the digits, while there are at most 19 */
    int digits = 0;      /* significant digits seen (leading zeros of a fraction not counted) */
    int frac = 0;        /* digits after the point */
    int neg = 0, integral = 1;
    long exp10 = 0;

    if (q < end && *q == '-') {
        neg = 1;
        q++;
    }
    if (q < end && *q == '0') {
        q++;
    } else if (q < end && *q >= '1' && *q <= '9') {
        while (q < end && *q >= '0' && *q <= '9') {
            if (digits < 19)
                m = m * 10 + (uint64_t)(*q - '0');
            digits++;
            q++;
        }
    } else {
        return fail(d, "bad number");
    }
    if (q < end && *q == '.') {
        integral = 0;
        q++;
        if (q >= end || *q < '0' || *q > '9')
            return fail(d, "bad number");
        while (q < end && *q >= '0' && *q <= '9') {
            if (digits > 0 || *q != '0')
                digits++;
            if (digits <= 19) {
                m = m * 10 + (uint64_t)(*q - '0');
                frac++;
            }
            q++;
        }
    }
    if (q < end && (*q == 'e' || *q == 'E')) {
        int eneg = 0;
        integral = 0;
        q++;
        if (q < end && (*q == '+' || *q == '-'))
            eneg = *q++ == '-';
        if (q >= end || *q < '0' || *q > '9')
            return fail(d, "bad number");
        while (q < end && *q >= '0' && *q <= '9') {
            if (exp10 < 100000)
                exp10 = exp10 * 10 + (*q - '0');
            q++;
        }
        if (eneg)
            exp10 = -exp10;
    }
    d->p = q;
    if (integral && digits <= 19) {
        if (!neg && m <= (uint64_t)INT64_MAX) {
#if LUA_VERSION_NUM >= 503
            lua_pushinteger(L, (lua_Integer)m);
#else
            lua_pushnumber(L, (lua_Number)m);
#endif
            return 1;
        }
        if (neg && m <= (uint64_t)INT64_MAX + 1) {
            long long v = m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(long long)m;
#if LUA_VERSION_NUM >= 503
            lua_pushinteger(L, (lua_Integer)v);
#else
            lua_pushnumber(L, (lua_Number)v);
#endif
            return 1;
        }
    }
    /* a float: exactly m * 10^e when both are exact doubles (one rounding), else strtod */
    exp10 -= frac;
    if (digits <= 15 && exp10 >= -22 && exp10 <= 22) {
        double v = (double)m;
        v = exp10 >= 0 ? v * POW10[exp10] : v / POW10[-exp10];
        lua_pushnumber(L, (lua_Number)(neg ? -v : v));
        return 1;
    } else {
        char local[64], *buf = local;
        size_t n = (size_t)(q - s);
        if (n >= sizeof local)
            buf = scratch(d, L, n + 1);
        memcpy(buf, s, n);
        buf[n] = '\0';
        lua_pushnumber(L, (lua_Number)strtod(buf, NULL));
        return 1;
    }
}

static int parse_value(jdec *d, lua_State *L, int depth);

/* d->p at a member's value of the top-level object, its key at the top of the stack. Pushes
 * the value: a sealed one put off by d->op (a placeholder), or read as any other; a string
 * that begins with the prefix yet was not put off asks the caller to scan. */
static int top_member(jdec *d, lua_State *L)
{
    qx_sealed_opener *op = d->op;
    const char *text = d->p + 1, *q, *s;
    size_t len;
    if (d->p < d->end && *d->p == '"' && (size_t)(d->end - text) >= op->plen &&
        memcmp(text, op->prefix, op->plen) == 0) {
        q = plain_run(text, d->end);
        if (q < d->end && *q == '"' && qx_sealed_defer(op, L, text, (size_t)(q - text))) {
            d->p = q + 1;
            return 1;
        }
    }
    if (!parse_value(d, L, 1))
        return 0;
    if (lua_type(L, -1) == LUA_TSTRING) {
        s = lua_tolstring(L, -1, &len);
        if (len >= op->plen && memcmp(s, op->prefix, op->plen) == 0)
            op->scan = 1;
    }
    return 1;
}

static int parse_container(jdec *d, lua_State *L, int depth)
{
    int object = *d->p == '{';
    char close = object ? '}' : ']';
    lua_Integer i = 0;

    if (depth >= QX_JSON_MAX_DEPTH)
        return fail(d, "nested deeper than " QX_JSON_MAX_DEPTH_TEXT " levels");
    if (!lua_checkstack(L, 4))
        return fail(d, "out of Lua stack");
    d->p++;
    lua_newtable(L);
    skip_space(d);
    if (d->p < d->end && *d->p == close) {
        d->p++;
        return 1;
    }
    for (;;) {
        if (object) {
            if (d->p >= d->end || *d->p != '"')
                return fail(d, "expected a string key");
            if (!parse_string(d, L))
                return 0;
            skip_space(d);
            if (d->p >= d->end || *d->p != ':')
                return fail(d, "expected ':'");
            d->p++;
            skip_space(d);
            if (!(depth == 0 && d->op != NULL ? top_member(d, L) : parse_value(d, L, depth + 1)))
                return 0;
            lua_rawset(L, -3);
        } else {
            if (!parse_value(d, L, depth + 1))
                return 0;
            lua_rawseti(L, -2, ++i);
        }
        skip_space(d);
        if (d->p < d->end && *d->p == ',') {
            d->p++;
            skip_space(d);
            continue;
        }
        if (d->p < d->end && *d->p == close) {
            d->p++;
            if (depth == 0 && object && d->op != NULL)
                qx_sealed_object_end(d->op, L);
            return 1;
        }
        return fail(d, object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int literal(jdec *d, const char *word, size_t n)
{
    if ((size_t)(d->end - d->p) < n || memcmp(d->p, word, n) != 0)
        return fail(d, "unexpected character");
    d->p += n;
    return 1;
}

/* d->p at the value (no space before it); depth: the containers around it. */
static int parse_value(jdec *d, lua_State *L, int depth)
{
    if (d->p >= d->end)
        return fail(d, "unexpected end");
    switch (*d->p) {
    case '"':
        return parse_string(d, L);
    case '{':
    case '[':
        return parse_container(d, L, depth);
    case 't':
        if (!literal(d, "true", 4))
            return 0;
        lua_pushboolean(L, 1);
        return 1;
    case 'f':
        if (!literal(d, "false", 5))
            return 0;
        lua_pushboolean(L, 0);
        return 1;
    case 'n':
        if (!literal(d, "null", 4))
            return 0;
        lua_pushlightuserdata(L, NULL);
        return 1;
    default:
        if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9'))
            return parse_number(d, L);
        return fail(d, "unexpected character");
    }
}

static int decode(lua_State *L, const char *text, size_t len, qx_sealed_opener *op,
                  const char **error)
{
    jdec d;
    int top = lua_gettop(L), ok;
    /* a lone string without escapes (a sealed field's value, often): the text itself */
    if (len >= 2 && text[0] == '"' && text[len - 1] == '"' &&
        plain_run(text + 1, text + len - 1) == text + len - 1) {
        lua_pushlstring(L, text + 1, len - 2);
        return 1;
    }
    luaL_checkstack(L, 8, "JSON decoding");
    d.start = d.p = text;
    d.end = text + len;
    d.error = NULL;
    d.scratch = NULL;
    d.scratch_cap = 0;
    d.op = op;
    lua_pushnil(L); /* the scratch slot */
    d.scratch_idx = top + 1;
    skip_space(&d);
    ok = parse_value(&d, L, 0);
    if (ok) {
        skip_space(&d);
        if (d.p != d.end)
            ok = fail(&d, "text after the value");
    }
    if (ok) {
        lua_replace(L, top + 1);
        return 1;
    }
    lua_settop(L, top);
    lua_pushfstring(L, "not JSON at byte %d: %s", (int)(d.p - d.start) + 1,
                    d.error != NULL ? d.error : "bad text");
    *error = lua_tostring(L, -1);
    return 0;
}

int qx_json_decode(lua_State *L, const char *text, size_t len, const char **error)
{
    return decode(L, text, len, NULL, error);
}

int qx_json_decode_sealed(lua_State *L, const char *text, size_t len, qx_sealed_opener *op,
                          const char **error)
{
    return decode(L, text, len, op, error);
}

/* core.json_decode(text) -> value | nil, err */
static int l_json_decode(lua_State *L)
{
    size_t len;
    const char *text = luaL_checklstring(L, 1, &len), *why = NULL;
    lua_settop(L, 1);
    if (qx_json_decode(L, text, len, &why))
        return 1;
    return qx_push_error_msg(L, "invalid", why);
}

void qx_open_json_decode(lua_State *L)
{
    lua_pushcfunction(L, l_json_decode);
    lua_setfield(L, -2, "json_decode");
}
