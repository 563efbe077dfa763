/*
 * Keyset cursor tokens, made and checked in one call each (the repository's cursors, see
 * lua/qx/repository_cursor.lua for what they hold and why):
 *
 *   token   = base64url(payload) "." base64url(HMAC-SHA256(key, domain || context || "\n" ||
 *                                                          base64url(payload)))
 *   payload = {"v":1,"k":[v1,...,vn]}   each v a JSON string or null
 *
 * Strings are escaped as lua-cjson escapes them (the encoder the tokens were made with before),
 * so a token is the same byte for byte whichever made it. Reading is strict: the payload must be
 * exactly this shape with n values; as only a token whose signature matched is read, anything
 * else means the listing changed shape, not an attack to survive.
 */
#include <string.h>

#include "qx.h"

static const char HEX[] = "0123456789abcdef";
static const char PREFIX[] = "{\"v\":1,\"k\":[";
static const char SUFFIX[] = "]}";

/* the longest JSON the payload of these values can be */
static size_t json_max(const qx_cursor_value *vals, int n)
{
    size_t len = sizeof PREFIX - 1 + sizeof SUFFIX - 1;
    int i;
    for (i = 0; i < n; i++) /* a comma, and "null" or a string of \u00XX escapes at most */
        len += 1 + (vals[i].s == NULL ? 4 : 2 + 6 * vals[i].len);
    return len;
}

size_t qx_cursor_encode_space(const qx_cursor_value *vals, int n)
{
    size_t json = json_max(vals, n);
    /* the JSON, then the token: its payload's base64url, the dot, the signature's, a NUL */
    return json + qx_b64url_encoded_len(json) + 1 + qx_b64url_encoded_len(QX_HMAC_SHA256_LEN) + 1;
}

/* the JSON text of s as lua-cjson writes it, at out; returns its end */
static char *json_string(char *out, const char *s, size_t len)
{
    size_t i;
    *out++ = '"';
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c != '/' && c != 0x7f) {
            *out++ = (char)c;
            continue;
        }
        *out++ = '\\';
        switch (c) {
        case '"': *out++ = '"'; break;
        case '\\': *out++ = '\\'; break;
        case '/': *out++ = '/'; break;
        case '\b': *out++ = 'b'; break;
        case '\t': *out++ = 't'; break;
        case '\n': *out++ = 'n'; break;
        case '\f': *out++ = 'f'; break;
        case '\r': *out++ = 'r'; break;
        default:
            *out++ = 'u';
            *out++ = '0';
            *out++ = '0';
            *out++ = HEX[c >> 4];
            *out++ = HEX[c & 15];
            break;
        }
    }
    *out++ = '"';
    return out;
}

static qx_status mac_of(unsigned char mac[QX_HMAC_SHA256_LEN], const void *key, size_t keylen,
                        const char *domain, size_t dlen, const char *context, size_t clen,
                        const char *body, size_t blen, qx_error *err)
{
    const void *parts[4];
    size_t lens[4];
    parts[0] = domain, lens[0] = dlen;
    parts[1] = context, lens[1] = clen;
    parts[2] = "\n", lens[2] = 1;
    parts[3] = body, lens[3] = blen;
    return qx_hmac_sha256_parts(mac, key, keylen, parts, lens, 4, err);
}

qx_status qx_cursor_encode(char *work, const char **token, size_t *toklen, const void *key,
                           size_t keylen, const char *domain, size_t dlen, const char *context,
                           size_t clen, const qx_cursor_value *vals, int n, qx_error *err)
{
    unsigned char mac[QX_HMAC_SHA256_LEN];
    char *json = work, *p = work, *tok, *body_end;
    size_t json_len, body_len;
    qx_status s;
    int i;

    memcpy(p, PREFIX, sizeof PREFIX - 1);
    p += sizeof PREFIX - 1;
    for (i = 0; i < n; i++) {
        if (i > 0)
            *p++ = ',';
        if (vals[i].s == NULL) {
            memcpy(p, "null", 4);
            p += 4;
        } else {
            p = json_string(p, vals[i].s, vals[i].len);
        }
    }
    memcpy(p, SUFFIX, sizeof SUFFIX - 1);
    p += sizeof SUFFIX - 1;
    json_len = (size_t)(p - json);
    tok = work + json_max(vals, n);
    qx_b64url_encode(tok, (const unsigned char *)json, json_len);
    body_len = qx_b64url_encoded_len(json_len);
    s = mac_of(mac, key, keylen, domain, dlen, context, clen, tok, body_len, err);
    if (s != QX_OK)
        return s;
    body_end = tok + body_len;
    *body_end = '.';
    qx_b64url_encode(body_end + 1, mac, sizeof mac);
    *token = tok;
    *toklen = body_len + 1 + qx_b64url_encoded_len(sizeof mac);
    return QX_OK;
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* four hex digits at p (end: the text's end) -> the code unit, or -1 */
static long hex4(const char *p, const char *end)
{
    long v = 0;
    int i;
    if (end - p < 4)
        return -1;
    for (i = 0; i < 4; i++) {
        int h = hex_value((unsigned char)p[i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

/* A JSON string at *pp (just past its opening quote) into out; returns its length, or -1. The
 * text is UTF-8 once its \u escapes are (surrogate pairs joined; a lone one is refused). */
static long json_unstring(const char **pp, const char *end, char *out)
{
    const char *p = *pp;
    char *o = out;
    while (p < end) {
        unsigned char c = (unsigned char)*p++;
        long u;
        if (c == '"') {
            *pp = p;
            return (long)(o - out);
        }
        if (c < 0x20)
            return -1;
        if (c != '\\') {
            *o++ = (char)c;
            continue;
        }
        if (p >= end)
            return -1;
        c = (unsigned char)*p++;
        switch (c) {
        case '"': case '\\': case '/': *o++ = (char)c; continue;
        case 'b': *o++ = '\b'; continue;
        case 'f': *o++ = '\f'; continue;
        case 'n': *o++ = '\n'; continue;
        case 'r': *o++ = '\r'; continue;
        case 't': *o++ = '\t'; continue;
        case 'u': break;
        default: return -1;
        }
        if ((u = hex4(p, end)) < 0)
            return -1;
        p += 4;
        if (u >= 0xd800 && u <= 0xdbff) { /* a high surrogate: its low one must follow */
            long lo;
            if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || (lo = hex4(p + 2, end)) < 0xdc00 ||
                lo > 0xdfff)
                return -1;
            p += 6;
            u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
        } else if (u >= 0xdc00 && u <= 0xdfff) {
            return -1;
        }
        /* UTF-8: never longer than the escape it came from (6 or 12 characters) */
        if (u < 0x80) {
            *o++ = (char)u;
        } else if (u < 0x800) {
            *o++ = (char)(0xc0 | (u >> 6));
            *o++ = (char)(0x80 | (u & 0x3f));
        } else if (u < 0x10000) {
            *o++ = (char)(0xe0 | (u >> 12));
            *o++ = (char)(0x80 | ((u >> 6) & 0x3f));
            *o++ = (char)(0x80 | (u & 0x3f));
        } else {
            *o++ = (char)(0xf0 | (u >> 18));
            *o++ = (char)(0x80 | ((u >> 12) & 0x3f));
            *o++ = (char)(0x80 | ((u >> 6) & 0x3f));
            *o++ = (char)(0x80 | (u & 0x3f));
        }
    }
    return -1;
}

size_t qx_cursor_decode_space(size_t toklen)
{
    /* the payload's bytes, and the strings unescaped from them (never longer) */
    return 2 * (toklen / 4 * 3 + 3);
}

qx_cursor_check qx_cursor_decode(const char *token, size_t toklen, const void *const *keys,
                                 const size_t *keylens, int nkeys, const char *domain,
                                 size_t dlen, const char *context, size_t clen, int n,
                                 char *work, qx_cursor_value *vals, qx_error *err)
{
    const char *dot = memchr(token, '.', toklen), *p, *end;
    unsigned char given[QX_HMAC_SHA256_LEN + 3], mac[QX_HMAC_SHA256_LEN];
    size_t body_len, sig_len, given_len = 0, json_len = 0;
    char *json = work, *strings = work + toklen / 4 * 3 + 3;
    qx_error ignored;
    int i, ok = 0;

    if (dot == NULL)
        return QX_CURSOR_MALFORMED;
    body_len = (size_t)(dot - token);
    sig_len = toklen - body_len - 1;
    /* 43 characters are 32 bytes; anything longer cannot be a signature */
    if (sig_len != qx_b64url_encoded_len(QX_HMAC_SHA256_LEN) ||
        qx_b64url_decode(given, &given_len, dot + 1, sig_len, &ignored) != QX_OK ||
        given_len != QX_HMAC_SHA256_LEN)
        return QX_CURSOR_BAD_SIGNATURE;
    for (i = 0; i < nkeys; i++) {
        if (mac_of(mac, keys[i], keylens[i], domain, dlen, context, clen, token, body_len, err) !=
            QX_OK)
            return QX_CURSOR_ERROR;
        if (qx_equal_consttime(mac, given, sizeof mac)) {
            ok = 1;
            break;
        }
    }
    if (!ok)
        return QX_CURSOR_MISMATCH;
    /* signed by us: the rest can only fail if the listing's shape changed meanwhile */
    if (qx_b64url_decode((unsigned char *)json, &json_len, token, body_len, &ignored) != QX_OK)
        return QX_CURSOR_SHAPE;
    p = json;
    end = json + json_len;
    if (json_len < sizeof PREFIX - 1 || memcmp(p, PREFIX, sizeof PREFIX - 1) != 0)
        return QX_CURSOR_SHAPE;
    p += sizeof PREFIX - 1;
    for (i = 0; i < n; i++) {
        if (i > 0) {
            if (p >= end || *p != ',')
                return QX_CURSOR_SHAPE;
            p++;
        }
        if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
            vals[i].s = NULL;
            vals[i].len = 0;
            p += 4;
        } else if (p < end && *p == '"') {
            long len;
            p++;
            if ((len = json_unstring(&p, end, strings)) < 0)
                return QX_CURSOR_SHAPE;
            vals[i].s = strings;
            vals[i].len = (size_t)len;
            strings += len;
        } else {
            return QX_CURSOR_SHAPE;
        }
    }
    if ((size_t)(end - p) != sizeof SUFFIX - 1 || memcmp(p, SUFFIX, sizeof SUFFIX - 1) != 0)
        return QX_CURSOR_SHAPE;
    return QX_CURSOR_OK;
}
