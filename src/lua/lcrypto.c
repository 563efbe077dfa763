/* Signing functions of the module table: hmac_sha256, equal_consttime, b64url_encode/decode,
 * and keyset cursor tokens (cursor_encode/decode). */
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

#define LOCAL_VALUES 16

/* the cursor values array at idx (strings, or nil / core.null), n of them, into vals */
static void cursor_values(lua_State *L, int idx, int n, qx_cursor_value *vals)
{
    int i;
    for (i = 0; i < n; i++) {
        lua_rawgeti(L, idx, i + 1);
        if (lua_type(L, -1) == LUA_TSTRING) {
            vals[i].s = lua_tolstring(L, -1, &vals[i].len); /* anchored by the table */
        } else if (lua_isnil(L, -1) ||
                   (lua_islightuserdata(L, -1) && lua_touserdata(L, -1) == NULL)) {
            vals[i].s = NULL;
            vals[i].len = 0;
        } else {
            luaL_error(L, "cursor value %d must be a string or null, got %s", i + 1,
                       luaL_typename(L, -1));
        }
        lua_pop(L, 1);
    }
}

/* core.cursor_encode(key, domain, context, values, n) -> token */
static int l_cursor_encode(lua_State *L)
{
    size_t klen, dlen, clen, toklen = 0;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *domain = luaL_checklstring(L, 2, &dlen);
    const char *context = luaL_checklstring(L, 3, &clen);
    int n = (int)luaL_checkinteger(L, 5);
    qx_cursor_value local_vals[LOCAL_VALUES], *vals = local_vals;
    const char *token;
    char *work;
    qx_error err;

    luaL_checktype(L, 4, LUA_TTABLE);
    luaL_argcheck(L, n >= 0 && n <= 1024, 5, "count out of range");
    if (n > LOCAL_VALUES)
        vals = lua_newuserdata(L, sizeof *vals * (size_t)n);
    cursor_values(L, 4, n, vals);
    work = lua_newuserdata(L, qx_cursor_encode_space(vals, n));
    if (qx_cursor_encode(work, &token, &toklen, key, klen, domain, dlen, context, clen, vals, n,
                         &err) != QX_OK)
        return luaL_error(L, "%s", err.message);
    lua_pushlstring(L, token, toklen);
    return 1;
}

/* core.cursor_decode(keys, domain, context, token, n) -> values | nil, why
 * why: "malformed", "signature" (not a signature), "mismatch" (no key signed it), "shape" */
static int l_cursor_decode(lua_State *L)
{
    static const char *const why[] = { NULL, "malformed", "signature", "mismatch", "shape" };
    size_t dlen, clen, toklen;
    const char *domain = luaL_checklstring(L, 2, &dlen);
    const char *context = luaL_checklstring(L, 3, &clen);
    const char *token = luaL_checklstring(L, 4, &toklen);
    int n = (int)luaL_checkinteger(L, 5), nkeys, i;
    qx_cursor_value local_vals[LOCAL_VALUES], *vals = local_vals;
    const void *local_keys[LOCAL_VALUES], **keys = local_keys;
    size_t local_lens[LOCAL_VALUES], *lens = local_lens;
    qx_cursor_check r;
    char *work;
    qx_error err;

    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_argcheck(L, n >= 0 && n <= 1024, 5, "count out of range");
    nkeys = (int)qx_rawlen(L, 1);
    if (n > LOCAL_VALUES)
        vals = lua_newuserdata(L, sizeof *vals * (size_t)n);
    if (nkeys > LOCAL_VALUES) {
        keys = lua_newuserdata(L, sizeof *keys * (size_t)nkeys);
        lens = lua_newuserdata(L, sizeof *lens * (size_t)nkeys);
    }
    for (i = 0; i < nkeys; i++) {
        lua_rawgeti(L, 1, i + 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            return luaL_error(L, "cursor key %d is not a string", i + 1);
        keys[i] = lua_tolstring(L, -1, &lens[i]); /* anchored by the table */
        lua_pop(L, 1);
    }
    work = lua_newuserdata(L, qx_cursor_decode_space(toklen));
    r = qx_cursor_decode(token, toklen, keys, lens, nkeys, domain, dlen, context, clen, n, work,
                         vals, &err);
    if (r == QX_CURSOR_ERROR)
        return luaL_error(L, "%s", err.message);
    if (r != QX_CURSOR_OK) {
        lua_pushnil(L);
        lua_pushstring(L, why[r]);
        return 2;
    }
    lua_createtable(L, n, 0);
    for (i = 0; i < n; i++) {
        if (vals[i].s == NULL)
            lua_pushlightuserdata(L, NULL);
        else
            lua_pushlstring(L, vals[i].s, vals[i].len);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static const luaL_Reg funcs[] = {
    { "cursor_encode", l_cursor_encode },
    { "cursor_decode", l_cursor_decode },
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
