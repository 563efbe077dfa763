/* Declarations shared by the binding's files. The binding holds no logic of its own: it turns
 * core objects into userdata and converts values. */
#ifndef QX_BINDING_H
#define QX_BINDING_H

#include "compat.h"
#include "qx.h"

#define QX_POOL_MT "qx.pool"
#define QX_CONN_MT "qx.conn"
#define QX_ERROR_MT "qx.error"
#define QX_NATS_MT "qx.nats"
#define QX_CONSUMER_MT "qx.consumer"
#define QX_CONSUMER_MSG_MT "qx.consumer_msg"
#define QX_TX_MT "qx.tx"

/* Pushes nil and an error table { code, message, sqlstate?, retryable? }; returns 2. */
int qx_push_error(lua_State *L, const qx_error *err);
/* Same, for an error made here. */
int qx_push_error_msg(lua_State *L, const char *code, const char *message);

/* ---- option tables (lutil.c) -------------------------------------------------------------
 * A constructor takes one table of options. Misuse raises at level 2 (at the binding's caller)
 * with a message naming `what` (e.g. "core.pool") and the option. */

/* Raises unless the value at idx is a table whose keys are all in known (NULL-terminated); the
 * message lists the known keys. */
void qx_opt_check(lua_State *L, int idx, const char *what, const char *const *known);
/* Field name of the table at idx: an integer from lo to hi, or dflt when nil. */
long long qx_opt_int(lua_State *L, int idx, const char *what, const char *name, long long lo,
                     long long hi, long long dflt);
/* A string (it stays alive in the table), or dflt when nil; required: nil raises. */
const char *qx_opt_string(lua_State *L, int idx, const char *what, const char *name,
                          const char *dflt, int required);
/* A boolean, or dflt when nil. */
int qx_opt_bool(lua_State *L, int idx, const char *what, const char *name, int dflt);

/* ---- userdata types (lutil.c) ------------------------------------------------------------
 * Every userdata of the binding is a struct whose first field points at its core object, NULL
 * while closed. It is created closed (qx_new_closed) and only then is the core object made
 * and stored, so an error in between leaks nothing. One close function is __gc, __close and
 * the close method: it calls the type's close only while the pointer is set, so closing twice
 * is harmless. */
typedef struct qx_type {
    const char *name;         /* metatable name; tostring prints it */
    const luaL_Reg *methods;
    const char *close_method; /* the method that closes it ("close", "release"), or NULL */
    /* Releases the core object of the open userdata ud (at index 1) and sets the pointer to
     * NULL (or, for an object busy elsewhere, arranges for that). */
    void (*close)(lua_State *L, void *ud);
    /* Writes a short description of the open object for tostring, or NULL: none. */
    void (*describe)(void *ud, char *buf, size_t size);
    const char *closed_word;  /* tostring of a closed one: "closed", "released" */
    /* NULL: __index is the methods table. Else __index is this function, with the methods
     * table as upvalue 1 (for userdata with fields). */
    lua_CFunction index;
} qx_type;

/* Registers the metatable once per state: methods (and the close method) as __index, the
 * close function as __gc and __close, and __tostring: "name (description, address)". */
void qx_register_type(lua_State *L, const qx_type *t);
/* For the types whose methods run once per statement (connection, transaction): as
 * qx_register_type, and each method is a closure over the metatable, so that qx_to_hot finds
 * its self with one comparison; the metatable is also kept in the registry under key, for a
 * constructor to set without interning the type name. */
void qx_register_hot_type(lua_State *L, const qx_type *t, const void *key);
/* The userdata at index 1 of a method registered by qx_register_hot_type (open or closed), or
 * raises when it is not one of type tname (__gc and __close take the named check). */
void *qx_to_hot(lua_State *L, const char *tname);
/* A userdata (at the top) that must keep its parent (at the absolute index parent) alive: as its
 * user value on Lua 5.4 (returns LUA_NOREF), else by a registry reference (returned). qx_unhold
 * lets go of it (the userdata at ud; *ref becomes LUA_NOREF); twice is harmless. */
int qx_hold(lua_State *L, int parent);
void qx_unhold(lua_State *L, int ud, int *ref);
/* Pushes a new userdata of size bytes, zeroed (closed), with the type's metatable. */
void *qx_new_closed(lua_State *L, const qx_type *t, size_t size);
/* The userdata of type t at idx, or raises (wrong type; closed_msg when closed). */
void *qx_check_open(lua_State *L, int idx, const qx_type *t, const char *closed_msg);

/* The most levels of arrays and objects in a JSON document that qx writes or reads. */
#define QX_JSON_MAX_DEPTH 1000
#define QX_JSON_MAX_DEPTH_TEXT "1000"

/* Pushes the JSON text of the value at idx and returns 1; on a value JSON cannot hold pushes the
 * reason, points *error at it and returns 0. Numbers are exact (see ljson.c). */
int qx_json_push(lua_State *L, int idx, const char **error);
void qx_open_json(lua_State *L);

/* Pushes the value of the JSON text (len bytes) and returns 1; on text that is not JSON, or
 * nested deeper than QX_JSON_MAX_DEPTH, pushes the reason, points *error at it and returns 0.
 * Integers stay integers on Lua 5.4 (see ljsondec.c). */
int qx_json_decode(lua_State *L, const char *text, size_t len, const char **error);
void qx_open_json_decode(lua_State *L);

/* Parameters: converts the values at stack slots first..first+n-1 into text for libpq.
 * Pushes one anchor userdata/table that keeps the texts alive, nil when n is 0 (pop it when done).
 * On a value that cannot be sent, returns 0 and pushes nil, err (two values, no anchor). */
typedef struct qx_params {
    int n;
    const char **values;
    int *lengths;
} qx_params;
int qx_params_from_stack(lua_State *L, qx_params *out, int first, int n);

/* One parameter: the value at the absolute index idx as the text libpq sends ($pos in
 * messages). *value is NULL for SQL NULL; a number's text goes to num (QX_NUM_SCRATCH bytes); a
 * table's JSON text is pushed on the stack (*pushed = 1), where the caller keeps it while the
 * text is in use. Returns 1, or 0 with the reason in msg (nothing pushed). */
#define QX_NUM_SCRATCH 32
int qx_param_text(lua_State *L, int idx, int pos, const char **value, int *length, char *num,
                  int *pushed, char *msg, size_t msgsize);

/* ---- opening sealed values as rows are read (lsealed.c) ------------------------------------
 * For a read of the event store's rows: the top-level string members of one JSON column that
 * are sealed values ("<prefix><subject id>:<base64url>") are opened as the decoder meets them
 * (at the end of the object, once its event id is known: the id column's, else its member
 * event_id), with the key objects of a keys table (subject -> key object | false: forgotten);
 * so no sealed text becomes a Lua string. A value it cannot open here (no key kept for its
 * subject, no event id, altered) is left as its text, and its place noted for the caller to
 * open (or report) the slow way; one it cannot even place (malformed, escaped) asks the caller
 * to scan the rows. */
#define QX_SEALED_PENDING 32
typedef struct qx_sealed_opener {
    const char *prefix, *head;   /* the format's prefix and AAD head */
    size_t plen, hlen;
    int column, id_column;       /* the result's columns: the JSON one, the event id's */
    int slots;                   /* the first of the stack slots it uses (see lsealed.c) */
    const char *subject;         /* the text of the last subject met (a slot keeps it) */
    const char *id;              /* the current row's id column, or NULL */
    size_t idlen;
    unsigned char *buf;          /* scratch, cap bytes (a slot keeps it) */
    size_t cap;
    int row, nfound, nsubjects, scan, npending;
    struct {
        const char *text;        /* in the result, valid while the row is read */
        size_t len;
    } pending[QX_SEALED_PENDING]; /* the current object's sealed members, their keys in a slot */
} qx_sealed_opener;
/* Sets op up for the result r from the spec table at the absolute index spec ({ keys,
 * forgotten, prefix, aad_head, column, id_column }), raising on a malformed spec, and pushes
 * its slots; returns 0, pushing nothing, when r has no such columns. */
int qx_sealed_opener_init(lua_State *L, qx_sealed_opener *op, int spec, const qx_result *r);
/* The row about to be read (0-based): its id column. */
void qx_sealed_opener_row(qx_sealed_opener *op, const qx_result *r, int row);
/* A top-level string member, its key at the top of the stack and its text (len bytes, without
 * escapes) beginning with the prefix: 1 when it is put off to the object's end (a placeholder
 * pushed as its value), 0 when the decoder is to read it (nothing pushed). */
int qx_sealed_defer(qx_sealed_opener *op, lua_State *L, const char *text, size_t len);
/* The top-level object (at the top of the stack) is read: its put-off members are opened and
 * set, or set to their text and noted. */
void qx_sealed_object_end(qx_sealed_opener *op, lua_State *L);
/* Sets the field sealed of the table at the absolute index t: true when every sealed value was
 * opened, { found = { row, key, ... }, subjects = { ... } } for the ones left (rows 1-based),
 * false when the rows must be scanned; and pops the slots. */
void qx_sealed_opener_finish(lua_State *L, qx_sealed_opener *op, int t);

/* Pushes the value of the JSON text as qx_json_decode does, opening the sealed values among the
 * top-level object's string members with op. */
int qx_json_decode_sealed(lua_State *L, const char *text, size_t len, qx_sealed_opener *op,
                          const char **error);

/* Pushes the rows of a result as an array of { column = value } tables; NULL is core.null, or
 * with skip_nulls the column is left out of the row (it reads as nil). max_rows >= 0: only the
 * first max_rows rows are made into tables (the rest are left in the result). op: NULL, or the
 * opener of the sealed values of its JSON column. */
void qx_push_rows(lua_State *L, const qx_result *r, int skip_nulls, int max_rows,
                  qx_sealed_opener *op);

/* A batch's statements (lbatch.c), as conn:batch and wire:batch take them: the list at the
 * absolute index list, of n tables { sql, p1, ..., pk[, n = k] }, into stmts. Pushes one anchor
 * per statement that keeps its texts alive (pop them when done) and returns 1; on a parameter
 * that cannot be sent pushes nil, err, the statement's index (1-based) and returns 0. Raises
 * on a malformed list. */
int qx_batch_stmts(lua_State *L, int list, int n, qx_stmt *stmts);
/* Pushes the results table of a batch: { rows, affected } per statement, made from index first
 * on (earlier ones are true; a NULL result false), each freed (and set to NULL) as it is made.
 * list: the absolute index of the statement list (a statement's open_sealed), or 0. */
void qx_push_batch_results(lua_State *L, qx_result **results, int n, int first, int list);

int qx_open_pool(lua_State *L);
/* core.pool{ conninfo, size, acquire_timeout_ms, recycle_ms, connect_timeout_ms } */
int qx_pool_new_lua(lua_State *L);
int qx_open_conn(lua_State *L);
/* Pushes a new connection userdata of the pool p (the userdata at pool_idx), not yet leasing
 * anything, and returns the slot the lease goes into: made first, so that a failed allocation
 * cannot leak a leased connection. */
qx_conn **qx_conn_push(lua_State *L, qx_pool *p, int pool_idx);
/* Undoes what qx_conn_push holds when the lease failed (the userdata at idx stays closed). */
void qx_conn_unpush(lua_State *L, int idx);
/* The slot of the connection userdata at idx (NULL there once released); raises when it is not
 * a connection or was released. */
qx_conn **qx_check_conn_slot(lua_State *L, int idx);
/* The transaction (ltx.c): registers the metatable and adds tx to the table at the top. */
void qx_open_tx(lua_State *L);
/* Adds hmac_sha256, sha256, equal_consttime, b64url_encode, b64url_decode to the table at the top. */
void qx_open_crypto(lua_State *L);
/* Adds aead_key, sealed_find and open_sealed (lsealed.c) to the table at the top. */
void qx_open_sealed(lua_State *L);

/* NATS (lnats.c): the connection userdata. qx_check_nats returns the connection at idx or
 * raises (not a NATS connection, or closed); a binding that keeps it past the call retains it
 * (qx_nats_retain) and holds a registry reference to the userdata. */
qx_nats *qx_check_nats(lua_State *L, int idx);
int qx_nats_new_lua(lua_State *L);
/* Registers the metatable and adds nats, nats_subject_valid, is_nats to the table at the top. */
void qx_open_nats(lua_State *L);

/* JetStream pull consumer (lconsumer.c): registers the metatable and adds consumer to the table
 * at the top. */
void qx_open_consumer(lua_State *L);

/* The outbox relay (lrelay.c): adds relay to the table at the top. */
void qx_open_relay(lua_State *L);

/* The wire codec (lwire.c): registers the metatable and adds wire to the table at the top.
 * qx_check_wire returns the open codec at idx or raises; qx_test_wire returns NULL when the
 * value at idx is not an open codec. */
#define QX_WIRE_MT "qx.wire"
void qx_open_wire(lua_State *L);
qx_wire *qx_check_wire(lua_State *L, int idx);
qx_wire *qx_test_wire(lua_State *L, int idx);
/* The wire codec userdata's slot at idx (NULL there once closed), or NULL when idx holds none. */
qx_wire **qx_test_wire_slot(lua_State *L, int idx);

/* A runner's /metrics and /health server (lhttpd.c): adds metrics_server to the table at the
 * top. */
void qx_open_httpd(lua_State *L);

#endif
