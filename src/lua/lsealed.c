/* Opening the sealed personal fields of records from Lua (a sealed value's layout and its
 * opening are the core's: qx_sealed_kind, qx_sealed_open; lua/qx/store/personal.lua passes the
 * prefix and AAD head): the key object (core.aead_key); the sealed values of a list of records
 * and the subjects they need keys for (core.sealed_find) and their opening (core.open_sealed);
 * and the opener of a read's rows (qx_sealed_opener, binding.h), which opens them as the JSON
 * decoder meets them. Only a value's opened value becomes a Lua value. */
#include <string.h>

#include "binding.h"

#define QX_AEAD_KEY_MT "qx.aead_key"

typedef struct laead_key {
    qx_aead_key *k;
} laead_key;

static void key_close(lua_State *L, void *ud)
{
    laead_key *lk = ud;
    (void)L;
    qx_aead_key_free(lk->k);
    lk->k = NULL;
}

/* key:open(aad, sealed) -> plain | nil, err: core.aead_open under this key */
static int l_key_open(lua_State *L)
{
    laead_key *lk = luaL_checkudata(L, 1, QX_AEAD_KEY_MT);
    size_t alen, slen, outlen = 0;
    const char *aad = luaL_checklstring(L, 2, &alen);
    const char *sealed = luaL_checklstring(L, 3, &slen);
    unsigned char *out;
    qx_error err;
    if (lk->k == NULL)
        return luaL_error(L, "key object is closed");
    out = lua_newuserdata(L, slen > QX_AEAD_OVERHEAD ? slen - QX_AEAD_OVERHEAD : 1);
    if (qx_aead_key_open(lk->k, out, &outlen, aad, alen, sealed, slen, &err) != QX_OK) {
        if (err.status != QX_ERR_INVALID)
            return luaL_error(L, "%s", err.message);
        return qx_push_error(L, &err);
    }
    lua_pushlstring(L, (const char *)out, outlen);
    return 1;
}

static const luaL_Reg key_methods[] = {
    { "open", l_key_open },
    { NULL, NULL }
};

/* no close method: a key object lives until it is collected (the key schedule is cleansed), or
 * until a to-be-closed variable holding it goes out of scope */
static const qx_type key_type = {
    QX_AEAD_KEY_MT, key_methods, NULL, key_close, NULL, "closed", NULL
};


/* core.aead_key(key) -> a key object (32 bytes), for open_sealed and key:open */
static int l_aead_key(lua_State *L)
{
    size_t klen;
    const char *key = luaL_checklstring(L, 1, &klen);
    laead_key *lk;
    qx_error err;
    luaL_argcheck(L, klen == QX_AEAD_KEY_LEN, 1, "key must be 32 bytes");
    lk = qx_new_closed(L, &key_type, sizeof *lk);
    lk->k = qx_aead_key_new((const unsigned char *)key, &err);
    if (lk->k == NULL)
        return luaL_error(L, "%s", err.message);
    return 1;
}

/* The value at idx as text, pushed (a copy: a number is not converted in its slot): what
 * tostring gives for strings, numbers, booleans and nil, else the type's name. */
static const char *push_text(lua_State *L, int idx)
{
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
    case LUA_TNUMBER:
        lua_pushvalue(L, idx);
        return lua_tostring(L, -1);
    case LUA_TBOOLEAN:
        lua_pushstring(L, lua_toboolean(L, idx) ? "true" : "false");
        return lua_tostring(L, -1);
    case LUA_TNIL:
        lua_pushliteral(L, "nil");
        return lua_tostring(L, -1);
    default:
        lua_pushstring(L, luaL_typename(L, idx));
        return lua_tostring(L, -1);
    }
}

/* Makes slot hold the subject id at text (QX_SEALED_SUBJECT_LEN bytes), *last being the slot's
 * text (NULL while it holds none): 1 when it changed, 0 when it held that subject already (an
 * event's fields share theirs, so most lookups are saved). */
static int same_subject_else_set(lua_State *L, const char **last, const char *text, int slot)
{
    if (*last != NULL && memcmp(*last, text, QX_SEALED_SUBJECT_LEN) == 0)
        return 0;
    lua_pushlstring(L, text, QX_SEALED_SUBJECT_LEN);
    lua_replace(L, slot);
    *last = lua_tostring(L, slot);
    return 1;
}

/* A buffer kept as a userdata at a stack slot, grown as needed. */
typedef struct scratch {
    int slot;
    unsigned char *p;
    size_t cap;
} scratch;

static unsigned char *scratch_get(lua_State *L, scratch *s, size_t n)
{
    if (n > s->cap) {
        s->cap = n < 512 ? 512 : n;
        s->p = lua_newuserdata(L, s->cap);
        lua_replace(L, s->slot);
    }
    return s->p;
}

enum { OPENED, NOT_OPENED, NOT_JSON };

/* Opens the sealed text (len bytes, of kind 1 under a prefix of plen bytes) under lk, bound to
 * head .. id .. "\n" .. field, and decodes its JSON. OPENED: the value is pushed. NOT_OPENED:
 * err says why (nothing pushed). NOT_JSON: the decoder's message is pushed. */
static int open_text(lua_State *L, scratch *sc, laead_key *lk, const char *head, size_t hlen,
                     const char *id, size_t idlen, const char *field, size_t klen,
                     const char *text, size_t len, size_t plen, qx_error *err)
{
    unsigned char *buf = scratch_get(L, sc, qx_sealed_buf_len(hlen, idlen, klen, len));
    const unsigned char *plain;
    size_t plain_len;
    const char *why = NULL;
    if (qx_sealed_open(lk->k, head, hlen, id, idlen, field, klen, text, len, plen, buf, &plain,
                       &plain_len, err) != QX_OK)
        return NOT_OPENED;
    return qx_json_decode(L, (const char *)plain, plain_len, &why) ? OPENED : NOT_JSON;
}

/* The key object at idx (a userdata whose metatable is the one at mt), or NULL. */
static laead_key *key_at(lua_State *L, int idx, int mt)
{
    laead_key *lk = lua_touserdata(L, idx);
    int same;
    if (lk == NULL || !lua_getmetatable(L, idx))
        return NULL;
    same = lua_rawequal(L, -1, mt);
    lua_pop(L, 1);
    return same && lk->k != NULL ? lk : NULL;
}

/* core.sealed_find(tables, prefix) -> subjects, found | nil | false, i, key
 * The sealed values of tables[1..n]: subjects, the distinct subject ids (a list), and found,
 * where they are: i, key for each, one after another. nil when none is sealed;
 * false, i, key when tables[i][key] begins with prefix but not with a subject id and ':'. */
static int l_sealed_find(lua_State *L)
{
    size_t plen;
    const char *prefix;
    const char *last = NULL; /* slot 6's text */
    int i, n, nlist = 0, nfound = 0;
    luaL_checktype(L, 1, LUA_TTABLE);
    prefix = luaL_checklstring(L, 2, &plen);
    n = (int)qx_rawlen(L, 1);
    lua_settop(L, 2);
    lua_pushnil(L); /* 3: the set of subjects met */
    lua_pushnil(L); /* 4: their list */
    lua_pushnil(L); /* 5: found */
    lua_pushnil(L); /* 6: the last subject met */
    for (i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, i); /* 7 */
        luaL_argcheck(L, lua_type(L, 7) == LUA_TTABLE, 1, "expected a list of tables");
        lua_pushnil(L);
        while (lua_next(L, 7) != 0) { /* 8: key, 9: value */
            size_t len;
            const char *s;
            int kind;
            if (lua_type(L, 9) != LUA_TSTRING) {
                lua_pop(L, 1);
                continue;
            }
            s = lua_tolstring(L, 9, &len);
            kind = qx_sealed_kind(s, len, prefix, plen, 1);
            if (kind < 0) {
                lua_pushboolean(L, 0);
                lua_pushinteger(L, i);
                lua_pushvalue(L, 8);
                return 3;
            }
            if (kind > 0) {
                if (nfound == 0) {
                    lua_newtable(L);
                    lua_replace(L, 3);
                    lua_newtable(L);
                    lua_replace(L, 4);
                    lua_newtable(L);
                    lua_replace(L, 5);
                }
                lua_pushinteger(L, i);
                lua_rawseti(L, 5, ++nfound);
                lua_pushvalue(L, 8);
                lua_rawseti(L, 5, ++nfound);
                if (same_subject_else_set(L, &last, s + plen, 6)) {
                    lua_pushvalue(L, 6);
                    lua_rawget(L, 3);
                    if (lua_isnil(L, -1)) {
                        lua_pushvalue(L, 6);
                        lua_rawseti(L, 4, ++nlist);
                        lua_pushvalue(L, 6);
                        lua_pushboolean(L, 1);
                        lua_rawset(L, 3);
                    }
                    lua_pop(L, 1);
                }
            }
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    if (nfound == 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushvalue(L, 4);
    lua_pushvalue(L, 5);
    return 2;
}

/* Pushes the event id of tables[i]: ids[i] (ids at slot 3), or else the field event_id of the
 * table at slot t. */
static void push_event_id(lua_State *L, int i, int t)
{
    if (!lua_isnil(L, 3)) {
        lua_rawgeti(L, 3, i);
        if (!lua_isnil(L, -1))
            return;
        lua_pop(L, 1);
    }
    lua_getfield(L, t, "event_id");
}

/* Fails open_sealed: nil and "field '<key>' of event <id>" followed by what, formatted with
 * text (one %s). key and id are stack slots. */
static int fail_field(lua_State *L, int key, int id, const char *what, const char *text)
{
    const char *k = push_text(L, key), *e = push_text(L, id);
    lua_pushnil(L);
    lua_pushfstring(L, "field '%s' of event %s", k, e);
    lua_pushfstring(L, what, text);
    lua_concat(L, 2);
    return 2;
}

/* core.open_sealed(tables, found, ids, keys, forgotten, aad_head, prefix) -> true | nil, msg
 * Replaces each sealed value that found (from sealed_find) points at by the value it seals.
 * tables[i] holds event ids[i]'s fields (ids nil, or no ids[i]: its field event_id); keys maps
 * a subject id to its key object, or to false when the subject is forgotten (the value becomes
 * forgotten). The AAD of a value is aad_head .. event id .. "\n" .. field. The first value that
 * has no key, does not open or is not JSON stops it with the message; those before it are
 * opened already. */
static int l_open_sealed(lua_State *L)
{
    size_t hlen, plen;
    const char *head, *prefix, *subject = NULL; /* slot 12's text */
    int j, nfound, last = 0;
    scratch sc;
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    if (!lua_isnoneornil(L, 3))
        luaL_checktype(L, 3, LUA_TTABLE);
    luaL_checktype(L, 4, LUA_TTABLE);
    luaL_checkany(L, 5);
    head = luaL_checklstring(L, 6, &hlen);
    prefix = luaL_checklstring(L, 7, &plen);
    nfound = (int)qx_rawlen(L, 2);
    lua_settop(L, 7);
    lua_pushnil(L);                       /* 8: the scratch buffer */
    luaL_getmetatable(L, QX_AEAD_KEY_MT); /* 9 */
    lua_pushnil(L);                       /* 10: the table of the last value */
    lua_pushnil(L);                       /* 11: its event id's text */
    lua_pushnil(L);                       /* 12: the last subject */
    lua_pushnil(L);                       /* 13: its key */
    sc.slot = 8;
    sc.p = NULL;
    sc.cap = 0;
    for (j = 1; j + 1 <= nfound; j += 2) {
        size_t len, klen, idlen;
        const char *s, *ktext, *idtext;
        laead_key *lk;
        qx_error err;
        int i;
        lua_settop(L, 13);
        lua_rawgeti(L, 2, j);
        i = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        if (i != last) {
            lua_rawgeti(L, 1, i);
            luaL_argcheck(L, lua_type(L, -1) == LUA_TTABLE, 1, "expected a list of tables");
            lua_replace(L, 10);
            push_event_id(L, i, 10);
            push_text(L, -1);
            lua_replace(L, 11);
            lua_pop(L, 1);
            last = i;
        }
        lua_rawgeti(L, 2, j + 1); /* 14: the field */
        lua_pushvalue(L, 14);
        lua_rawget(L, 10);        /* 15: its sealed text */
        if (lua_type(L, 15) != LUA_TSTRING ||
            (s = lua_tolstring(L, 15, &len), qx_sealed_kind(s, len, prefix, plen, 0) <= 0))
            return fail_field(L, 14, 11, ": %s", "malformed sealed value");
        if (same_subject_else_set(L, &subject, s + plen, 12)) {
            lua_pushvalue(L, 12);
            lua_rawget(L, 4);
            lua_replace(L, 13);
        }
        if (lua_type(L, 13) == LUA_TBOOLEAN && !lua_toboolean(L, 13)) {
            lua_settop(L, 14);
            lua_pushvalue(L, 5);
            lua_rawset(L, 10); /* the field (14) gets forgotten */
            continue;
        }
        if (lua_isnil(L, 13))
            return fail_field(L, 14, 11, ": no key for data subject %s", subject);
        lk = key_at(L, 13, 9);
        if (lk == NULL)
            return luaL_argerror(L, 4, "expected subject ids mapped to core.aead_key objects "
                                       "or false");
        ktext = lua_type(L, 14) == LUA_TSTRING ? lua_tolstring(L, 14, &klen)
                                                : (push_text(L, 14), lua_tolstring(L, -1, &klen));
        idtext = lua_tolstring(L, 11, &idlen);
        switch (open_text(L, &sc, lk, head, hlen, idtext, idlen, ktext, klen, s, len, plen,
                          &err)) {
        case NOT_OPENED:
            if (err.status != QX_ERR_INVALID)
                return luaL_error(L, "%s", err.message);
            return fail_field(L, 14, 11, " does not open: %s", err.message);
        case NOT_JSON:
            return fail_field(L, 14, 11, ": %s", lua_tostring(L, -1));
        }
        lua_replace(L, 15);
        lua_settop(L, 15);
        lua_rawset(L, 10); /* the field (14) gets the value (15) */
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- opening as rows are read (qx_sealed_opener, binding.h) ---------------------------------
 * The opener's stack slots, from op->slots on: */
enum {
    OP_KEYS,      /* subject -> key object | false */
    OP_FORGOTTEN, /* what a forgotten subject's values become */
    OP_KEY_MT,    /* the key objects' metatable */
    OP_PENDING,   /* the keys of the members put off, a list */
    OP_SCRATCH,   /* the buffer (nil until needed) */
    OP_SUBJECT,   /* the last subject met */
    OP_KEY,       /* its entry in keys */
    OP_FOUND,     /* the values left: row, key, ... (nil until one is) */
    OP_SUBJECTS,  /* their subjects, a list */
    OP_SEEN,      /* and a set */
    OP_NSLOTS
};

static const char *spec_string(lua_State *L, int spec, const char *name, size_t *len)
{
    const char *s;
    lua_getfield(L, spec, name);
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "open_sealed: %s must be a string", name);
    s = lua_tolstring(L, -1, len); /* the spec keeps it */
    lua_pop(L, 1);
    return s;
}

static int column_of(const qx_result *r, const char *name)
{
    int col, n = qx_result_ncols(r);
    for (col = 0; col < n; col++)
        if (strcmp(qx_result_colname(r, col), name) == 0)
            return col;
    return -1;
}

int qx_sealed_opener_init(lua_State *L, qx_sealed_opener *op, int spec, const qx_result *r)
{
    const char *column, *id_column;
    size_t n;
    int i;
    if (lua_type(L, spec) != LUA_TTABLE)
        luaL_error(L, "open_sealed must be a table");
    memset(op, 0, sizeof *op);
    op->prefix = spec_string(L, spec, "prefix", &op->plen);
    op->head = spec_string(L, spec, "aad_head", &op->hlen);
    column = spec_string(L, spec, "column", &n);
    id_column = spec_string(L, spec, "id_column", &n);
    if (op->plen == 0)
        luaL_error(L, "open_sealed: prefix must not be empty");
    op->column = column_of(r, column);
    op->id_column = column_of(r, id_column);
    if (op->column < 0 || op->id_column < 0)
        return 0;
    luaL_checkstack(L, OP_NSLOTS + 8, "open_sealed");
    op->slots = lua_gettop(L) + 1;
    lua_getfield(L, spec, "keys");
    if (lua_type(L, -1) != LUA_TTABLE)
        luaL_error(L, "open_sealed: keys must be a table");
    lua_getfield(L, spec, "forgotten");
    if (lua_isnil(L, -1))
        luaL_error(L, "open_sealed: forgotten must be a value");
    luaL_getmetatable(L, QX_AEAD_KEY_MT);
    lua_createtable(L, 4, 0);
    for (i = OP_SCRATCH; i < OP_NSLOTS; i++)
        lua_pushnil(L);
    return 1;
}

void qx_sealed_opener_row(qx_sealed_opener *op, const qx_result *r, int row)
{
    op->row = row + 1;
    op->npending = 0;
    if (qx_result_isnull(r, row, op->id_column)) {
        op->id = NULL;
        return;
    }
    op->id = qx_result_value(r, row, op->id_column);
    op->idlen = (size_t)qx_result_length(r, row, op->id_column);
}

/* Makes the subject of the sealed text the one of slot OP_SUBJECT, with its entry of keys in
 * OP_KEY. */
static void set_subject(qx_sealed_opener *op, lua_State *L, const char *text)
{
    int s0 = op->slots;
    if (same_subject_else_set(L, &op->subject, text + op->plen, s0 + OP_SUBJECT)) {
        lua_pushvalue(L, s0 + OP_SUBJECT);
        lua_rawget(L, s0 + OP_KEYS);
        lua_replace(L, s0 + OP_KEY);
    }
}

static void leave(qx_sealed_opener *op, lua_State *L, const char *text, size_t len);

int qx_sealed_defer(qx_sealed_opener *op, lua_State *L, const char *text, size_t len)
{
    if (op->npending == QX_SEALED_PENDING) {
        /* more than an object's worth: this one is left for the slow path */
        if (qx_sealed_kind(text, len, op->prefix, op->plen, 1) <= 0)
            return 0; /* read as text, which asks for a scan */
        set_subject(op, L, text);
        leave(op, L, text, len);
        return 1;
    }
    op->pending[op->npending].text = text;
    op->pending[op->npending].len = len;
    lua_pushvalue(L, -1);
    lua_rawseti(L, op->slots + OP_PENDING, ++op->npending);
    lua_pushboolean(L, 0); /* holds the member's place until the object's end */
    return 1;
}

/* Leaves the value (text, len) of the member whose key is at the top for the slow path: pushes
 * its text and notes where it is and its subject (slot OP_SUBJECT). */
static void leave(qx_sealed_opener *op, lua_State *L, const char *text, size_t len)
{
    int found = op->slots + OP_FOUND, seen = op->slots + OP_SEEN;
    if (op->nfound == 0) {
        lua_newtable(L);
        lua_replace(L, found);
        lua_newtable(L);
        lua_replace(L, op->slots + OP_SUBJECTS);
        lua_newtable(L);
        lua_replace(L, seen);
    }
    lua_pushinteger(L, op->row);
    lua_rawseti(L, found, ++op->nfound);
    lua_pushvalue(L, -1);
    lua_rawseti(L, found, ++op->nfound);
    lua_pushvalue(L, op->slots + OP_SUBJECT);
    lua_rawget(L, seen);
    if (lua_isnil(L, -1)) {
        lua_pushvalue(L, op->slots + OP_SUBJECT);
        lua_rawseti(L, op->slots + OP_SUBJECTS, ++op->nsubjects);
        lua_pushvalue(L, op->slots + OP_SUBJECT);
        lua_pushboolean(L, 1);
        lua_rawset(L, seen);
    }
    lua_pop(L, 1);
    lua_pushlstring(L, text, len);
}

/* The member whose key is at the top, its sealed text (len bytes) and the event id (idlen
 * bytes, or NULL): pushes the value it seals, forgotten, or (left) its text. */
static void open_member(qx_sealed_opener *op, lua_State *L, const char *text, size_t len,
                        const char *id, size_t idlen)
{
    int s0 = op->slots, done;
    size_t plen = op->plen, klen;
    const char *field;
    laead_key *lk;
    scratch sc;
    qx_error err;

    if (qx_sealed_kind(text, len, op->prefix, plen, 1) <= 0) {
        op->scan = 1; /* malformed: the scan reports it */
        lua_pushlstring(L, text, len);
        return;
    }
    set_subject(op, L, text);
    if (lua_type(L, s0 + OP_KEY) == LUA_TBOOLEAN && !lua_toboolean(L, s0 + OP_KEY)) {
        lua_pushvalue(L, s0 + OP_FORGOTTEN);
        return;
    }
    lk = key_at(L, s0 + OP_KEY, s0 + OP_KEY_MT);
    if (id == NULL || lk == NULL || lua_type(L, -1) != LUA_TSTRING) {
        leave(op, L, text, len);
        return;
    }
    field = lua_tolstring(L, -1, &klen);
    sc.slot = s0 + OP_SCRATCH;
    sc.p = op->buf;
    sc.cap = op->cap;
    done = open_text(L, &sc, lk, op->head, op->hlen, id, idlen, field, klen, text, len, plen,
                     &err);
    op->buf = sc.p;
    op->cap = sc.cap;
    if (done == OPENED)
        return;
    /* what does not open here is opened (and reported) by the slow path */
    if (done == NOT_JSON)
        lua_pop(L, 1);
    leave(op, L, text, len);
}

void qx_sealed_object_end(qx_sealed_opener *op, lua_State *L)
{
    int t = lua_gettop(L), k, id_slot = 0;
    const char *id = op->id;
    size_t idlen = op->idlen;
    if (op->npending == 0)
        return;
    if (id == NULL) {
        /* no id column: the object's event_id, as a record has it */
        lua_getfield(L, t, "event_id");
        if (lua_type(L, -1) == LUA_TSTRING) {
            id = lua_tolstring(L, -1, &idlen);
            id_slot = lua_gettop(L);
        } else {
            lua_pop(L, 1);
        }
    }
    for (k = 0; k < op->npending; k++) {
        lua_rawgeti(L, op->slots + OP_PENDING, k + 1); /* the key */
        open_member(op, L, op->pending[k].text, op->pending[k].len, id, idlen);
        lua_rawset(L, t);
    }
    op->npending = 0;
    if (id_slot != 0)
        lua_settop(L, t);
}

void qx_sealed_opener_finish(lua_State *L, qx_sealed_opener *op, int t)
{
    if (op->scan) {
        lua_pushboolean(L, 0);
    } else if (op->nfound == 0) {
        lua_pushboolean(L, 1);
    } else {
        lua_createtable(L, 0, 2);
        lua_pushvalue(L, op->slots + OP_FOUND);
        lua_setfield(L, -2, "found");
        lua_pushvalue(L, op->slots + OP_SUBJECTS);
        lua_setfield(L, -2, "subjects");
    }
    lua_setfield(L, t, "sealed");
    lua_settop(L, op->slots - 1);
}

static const luaL_Reg funcs[] = {
    { "aead_key", l_aead_key },
    { "sealed_find", l_sealed_find },
    { "open_sealed", l_open_sealed },
    { NULL, NULL }
};

void qx_open_sealed(lua_State *L)
{
    qx_register_type(L, &key_type);
    qx_setfuncs(L, funcs, 0);
}
