/* Signing functions of the module table: hmac_sha256, equal_consttime, b64url_encode/decode. */
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

static const luaL_Reg funcs[] = {
    { "hmac_sha256", l_hmac_sha256 },
    { "equal_consttime", l_equal_consttime },
    { "b64url_encode", l_b64url_encode },
    { "b64url_decode", l_b64url_decode },
    { NULL, NULL }
};

void qx_open_crypto(lua_State *L)
{
    qx_setfuncs(L, funcs, 0);
}
