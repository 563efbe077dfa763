/* Signing functions of the module table: hmac_sha256, sha256, equal_consttime, b64url_encode/decode,
 * cursor_seal/cursor_open; sealing: random_bytes, aead_seal/aead_open (AES-256-GCM) and
 * aead_seal_b64 (sealed and base64url-encoded in one call; lsealed.c opens). */
#include "binding.h"

/* core.hmac_sha256(key, data) -> 32 raw bytes */
static int l_hmac_sha256(lua_State *L)
{
    size_t klen, dlen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *data = luaL_checklstring(L, 2, &dlen);
    unsigned char mac[QX_HMAC_SHA256_LEN];
    qx_error err;
    if (qx_hmac_sha256(mac, key, klen, data, dlen, &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    lua_pushlstring(L, (const char *)mac, sizeof mac);
    return 1;
}

/* core.sha256(data) -> 32 raw bytes */
static int l_sha256(lua_State *L)
{
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    unsigned char md[QX_SHA256_LEN];
    qx_error err;
    if (qx_sha256(md, data, len, &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    lua_pushlstring(L, (const char *)md, sizeof md);
    return 1;
}

/* core.equal_consttime(a, b) -> boolean; strings of different lengths are unequal */
static int l_equal_consttime(lua_State *L)
{
    size_t alen, blen;
    const char *a = luaL_checklstring(L, 1, &alen);
    const char *b = luaL_checklstring(L, 2, &blen);
    lua_pushboolean(L, alen == blen && qx_equal_consttime(a, b, alen));
    return 1;
}

/* core.b64url_encode(bytes) -> text */
static int l_b64url_encode(lua_State *L)
{
    size_t n;
    const char *in = luaL_checklstring(L, 1, &n);
    size_t len = qx_b64url_encoded_len(n);
    char *out = lua_newuserdata(L, len + 1);
    qx_b64url_encode(out, (const unsigned char *)in, n);
    lua_pushlstring(L, out, len);
    return 1;
}

/* core.b64url_decode(text) -> bytes | nil, err (invalid) */
static int l_b64url_decode(lua_State *L)
{
    size_t n, outlen = 0;
    const char *in = luaL_checklstring(L, 1, &n);
    unsigned char *out = lua_newuserdata(L, n / 4 * 3 + 3);
    qx_error err;
    if (qx_b64url_decode(out, &outlen, in, n, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* core.random_bytes(n) -> n random bytes (1 <= n <= 1024) */
static int l_random_bytes(lua_State *L)
{
    lua_Integer n = luaL_checkinteger(L, 1);
    unsigned char buf[1024];
    qx_error err;
    luaL_argcheck(L, n >= 1 && n <= (lua_Integer)sizeof buf, 1, "expected 1 to 1024 bytes");
    if (qx_random_bytes(buf, (size_t)n, &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    lua_pushlstring(L, (const char *)buf, (size_t)n);
    return 1;
}

static const unsigned char *aead_key(lua_State *L, int idx)
{
    size_t klen;
    const char *key = luaL_checklstring(L, idx, &klen);
    luaL_argcheck(L, klen == QX_AEAD_KEY_LEN, idx, "key must be 32 bytes");
    return (const unsigned char *)key;
}

/* core.aead_seal(key, aad, plain) -> nonce .. ciphertext .. tag (AES-256-GCM, 32-byte key) */
static int l_aead_seal(lua_State *L)
{
    size_t alen, plen;
    const unsigned char *key = aead_key(L, 1);
    const char *aad = luaL_checklstring(L, 2, &alen);
    const char *plain = luaL_checklstring(L, 3, &plen);
    unsigned char *out;
    qx_error err;
    luaL_argcheck(L, plen <= (size_t)0x7fffff00, 3, "value too long");
    out = lua_newuserdata(L, plen + QX_AEAD_OVERHEAD);
    if (qx_aead_seal(out, key, aad, alen, plain, plen, &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    lua_pushlstring(L, (const char *)out, plen + QX_AEAD_OVERHEAD);
    return 1;
}

/* core.aead_open(key, aad, sealed) -> plain | nil, err (invalid: altered, or another key/aad) */
static int l_aead_open(lua_State *L)
{
    size_t alen, slen, outlen = 0;
    const unsigned char *key = aead_key(L, 1);
    const char *aad = luaL_checklstring(L, 2, &alen);
    const char *sealed = luaL_checklstring(L, 3, &slen);
    unsigned char *out = lua_newuserdata(L, slen > QX_AEAD_OVERHEAD ? slen - QX_AEAD_OVERHEAD : 1);
    qx_error err;
    if (qx_aead_open(out, &outlen, key, aad, alen, sealed, slen, &err) != QX_OK) {
        if (err.status != QX_ERR_INVALID)
            return luaL_error(L, "%s", err.message);
        return qx_push_error(L, &err);
    }
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

/* core.aead_seal_b64(key, aad, plain) -> base64url(aead_seal(key, aad, plain)) */
static int l_aead_seal_b64(lua_State *L)
{
    size_t alen, plen, n, tlen;
    const unsigned char *key = aead_key(L, 1);
    const char *aad = luaL_checklstring(L, 2, &alen);
    const char *plain = luaL_checklstring(L, 3, &plen);
    unsigned char *sealed;
    char *text;
    qx_error err;
    luaL_argcheck(L, plen <= (size_t)0x3fffff00, 3, "value too long");
    n = plen + QX_AEAD_OVERHEAD;
    tlen = qx_b64url_encoded_len(n);
    sealed = lua_newuserdata(L, n);
    text = lua_newuserdata(L, tlen + 1);
    if (qx_aead_seal(sealed, key, aad, alen, plain, plen, &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    qx_b64url_encode(text, sealed, n);
    lua_pushlstring(L, text, tlen);
    return 1;
}

/* the values[1..n] of a cursor: strings, or nil / core.null for a null */
static int cursor_values(lua_State *L, int idx, int n, qx_cursor_value *v)
{
    int i;
    for (i = 0; i < n; i++) {
        int t;
        lua_rawgeti(L, idx, i + 1);
        t = lua_type(L, -1);
        if (t == LUA_TNIL || (t == LUA_TLIGHTUSERDATA && lua_touserdata(L, -1) == NULL)) {
            v[i].ptr = NULL;
            v[i].len = 0;
        } else if (t == LUA_TSTRING) {
            v[i].ptr = lua_tolstring(L, -1, &v[i].len); /* the table keeps it alive */
        } else {
            return luaL_error(L, "cursor value %d is a %s, expected a string or null", i + 1,
                              lua_typename(L, t));
        }
        lua_pop(L, 1);
    }
    return 0;
}

static int cursor_count(lua_State *L, int idx)
{
    lua_Integer n = luaL_checkinteger(L, idx);
    luaL_argcheck(L, n >= 0 && n <= QX_CURSOR_MAX_VALUES, idx, "too many cursor values");
    return (int)n;
}

/* core.cursor_seal(key, context, values, n) -> token (values[1..n]: strings or null) */
static int l_cursor_seal(lua_State *L)
{
    size_t klen, clen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *context = luaL_checklstring(L, 2, &clen);
    int n = cursor_count(L, 4);
    qx_cursor_value v[QX_CURSOR_MAX_VALUES];
    size_t len;
    char *out;
    qx_error err;
    luaL_checktype(L, 3, LUA_TTABLE);
    cursor_values(L, 3, n, v);
    len = qx_cursor_sealed_len(v, n);
    out = lua_newuserdata(L, len + 1);
    if (qx_cursor_seal(out, key, klen, context, clen, v, n, &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    lua_pushlstring(L, out, len);
    return 1;
}

/* core.cursor_open(keys, context, token, n) -> values | nil, why
 * keys: a list of strings, the first the one cursors are signed with; values[1..n] are strings
 * or core.null. */
static int l_cursor_open(lua_State *L)
{
    size_t clen, tlen, keylens[QX_CURSOR_MAX_KEYS];
    const void *keys[QX_CURSOR_MAX_KEYS];
    const char *context = luaL_checklstring(L, 2, &clen);
    const char *token = luaL_checklstring(L, 3, &tlen);
    int n = cursor_count(L, 4), nkeys, i;
    qx_cursor_value v[QX_CURSOR_MAX_VALUES];
    unsigned char frame[QX_CURSOR_MAX];
    qx_error err;
    luaL_checktype(L, 1, LUA_TTABLE);
    nkeys = (int)qx_rawlen(L, 1);
    if (nkeys < 1 || nkeys > QX_CURSOR_MAX_KEYS)
        return luaL_argerror(L, 1, lua_pushfstring(L, "expected 1 to %d keys", QX_CURSOR_MAX_KEYS));
    for (i = 0; i < nkeys; i++) {
        lua_rawgeti(L, 1, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_argerror(L, 1, "keys must be strings");
        keys[i] = lua_tolstring(L, -1, &keylens[i]); /* the table keeps it alive */
        lua_pop(L, 1);
    }
    if (qx_cursor_open(v, n, frame, token, tlen, keys, keylens, nkeys, context, clen, &err) !=
        QX_OK) {
        if (err.status != QX_ERR_INVALID)
            return luaL_error(L, "%s", err.message);
        lua_pushnil(L);
        lua_pushstring(L, err.message);
        return 2;
    }
    lua_createtable(L, n, 0);
    for (i = 0; i < n; i++) {
        if (v[i].ptr == NULL)
            lua_pushlightuserdata(L, NULL);
        else
            lua_pushlstring(L, v[i].ptr, v[i].len);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static const luaL_Reg funcs[] = {
    { "cursor_seal", l_cursor_seal },
    { "cursor_open", l_cursor_open },
    { "hmac_sha256", l_hmac_sha256 },
    { "sha256", l_sha256 },
    { "equal_consttime", l_equal_consttime },
    { "b64url_encode", l_b64url_encode },
    { "b64url_decode", l_b64url_decode },
    { "random_bytes", l_random_bytes },
    { "aead_seal", l_aead_seal },
    { "aead_open", l_aead_open },
    { "aead_seal_b64", l_aead_seal_b64 },
    { NULL, NULL }
};

void qx_open_crypto(lua_State *L)
{
    qx_setfuncs(L, funcs, 0);
    lua_pushinteger(L, QX_CURSOR_MAX);
    lua_setfield(L, -2, "CURSOR_MAX_LENGTH");
    lua_pushinteger(L, QX_CURSOR_MAX_KEYS);
    lua_setfield(L, -2, "CURSOR_MAX_KEYS");
}
