/* Pieces the core's files share, and the binding may use: a growable buffer (buf.c) and hash
 * tables (hash.c). Not part of the public header: no stable API, no Lua. */
#ifndef QX_INTERNAL_H
#define QX_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "qx.h"

/* Symbols shared between the core's files but not exported from the module. */
#define QX_INTERNAL __attribute__((visibility("hidden")))

/* ---- growable buffer (buf.c) ------------------------------------------------------------ */

/* Text that grows by doubling; always NUL-terminated once anything was appended. It may start
 * in storage the caller provides (a stack array: most texts fit, no malloc at all). After an
 * allocation failure `failed` is set and appends do nothing, so a caller may append a whole
 * text and check once at the end. */
typedef struct qx_buf {
    char *p;
    size_t len, cap;
    int failed;
    char *fixed;      /* the caller's storage, never freed; NULL when none */
    size_t fixed_cap;
} qx_buf;

/* storage may be NULL (cap 0): the first append allocates. */
QX_INTERNAL void qx_buf_init(qx_buf *b, char *storage, size_t cap);
/* Makes room for n more bytes and a NUL; 0 (and failed set) when memory ran out. */
QX_INTERNAL int qx_buf_grow(qx_buf *b, size_t n);
/* Frees what the buffer allocated; it is then empty and may be used again. */
QX_INTERNAL void qx_buf_free(qx_buf *b);
/* A PostgreSQL array element: s in double quotes, with " and \ escaped. */
QX_INTERNAL int qx_buf_append_quoted(qx_buf *b, const char *s);

/* Room for n more bytes and a NUL: a compare, inlined, unless it must grow. */
static inline int qx_buf_reserve(qx_buf *b, size_t n)
{
    return b->len + n + 1 <= b->cap || qx_buf_grow(b, n);
}

static inline int qx_buf_append(qx_buf *b, const void *s, size_t n)
{
    if (!qx_buf_reserve(b, n))
        return 0;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 1;
}

static inline int qx_buf_append_str(qx_buf *b, const char *s)
{
    return qx_buf_append(b, s, strlen(s));
}

/* ---- hash tables (hash.c) --------------------------------------------------------------- */

/* Hashes for open addressing with a power-of-two table. */
static inline unsigned int qx_hash_ptr(const void *p)
{
    uintptr_t v = (uintptr_t)p;
    v ^= v >> 17;
    v *= 0xed5ad4bbu;
    v ^= v >> 11;
    return (unsigned int)v;
}

/* Eight bytes a step (a statement's text is hashed on every use of the codec's cache): each
 * word mixed in by a multiply, the tail read as a partial word, the length folded in. */
static inline unsigned int qx_hash_str(const char *s)
{
    size_t n = strlen(s);
    uint64_t h = 0x9e3779b97f4a7c15u ^ (uint64_t)n, w;
    for (; n >= 8; n -= 8, s += 8) {
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdu;
        h ^= h >> 29;
    }
    if (n > 0) {
        w = 0;
        memcpy(&w, s, n);
        h = (h ^ w) * 0xff51afd7ed558ccdu;
    }
    h ^= h >> 32;
    h *= 0xc4ceb9fe1a85ec53u;
    h ^= h >> 29;
    return (unsigned int)h;
}

/* The smallest power of two >= n (at least 16). */
QX_INTERNAL int qx_hash_capacity(int n);

/* Pointer -> int, open addressing with linear probing and backward-shift deletion. Sized once
 * for a known most entries (twice that many slots); NULL is not a key. */
typedef struct qx_ptrmap {
    const void **keys;
    int *vals;
    int cap;
} qx_ptrmap;

QX_INTERNAL int qx_ptrmap_init(qx_ptrmap *m, int max_entries); /* 0: out of memory */
QX_INTERNAL void qx_ptrmap_free(qx_ptrmap *m);
QX_INTERNAL void qx_ptrmap_clear(qx_ptrmap *m);
QX_INTERNAL void qx_ptrmap_put(qx_ptrmap *m, const void *key, int val);
/* Removes key and returns its value, or -1 when it is not there. */
QX_INTERNAL int qx_ptrmap_take(qx_ptrmap *m, const void *key);

/* String -> int, the same way; the map keeps the key pointers, not copies (the strings must
 * outlive their entries). No deletion: clear between uses. */
typedef struct qx_strmap {
    const char **keys;
    int *vals;
    int cap;
} qx_strmap;

QX_INTERNAL int qx_strmap_init(qx_strmap *m, int max_entries); /* 0: out of memory */
QX_INTERNAL void qx_strmap_free(qx_strmap *m);
QX_INTERNAL void qx_strmap_clear(qx_strmap *m);
/* Sets key to val and returns the value it had, or -1 when it was not there. */
QX_INTERNAL int qx_strmap_swap(qx_strmap *m, const char *key, int val);
/* The value of key, or -1 when it is not there. */
QX_INTERNAL int qx_strmap_get(const qx_strmap *m, const char *key);

/* ---- results made from the protocol's messages (conn.c, for wire_batch.c) ------------------ */

/* A result of ncols columns (names and type OIDs; both copied), with rows (a statement that
 * returns rows, none yet) or not (a command); its affected count is 0 until set. NULL when
 * memory ran out. */
QX_INTERNAL qx_result *qx_result_make(int rows, int ncols, char *const *names,
                                      const unsigned int *types);
/* Sets a value of row (at most one past the last: that adds the row), copying len bytes; len
 * -1 is SQL NULL. 0 when memory ran out. */
QX_INTERNAL int qx_result_set(qx_result *r, int row, int col, const char *value, int len);
QX_INTERNAL void qx_result_set_affected(qx_result *r, long long n);


/* ---- server errors (error.c) ------------------------------------------------------------ */

/* Fills err (if not NULL) from a server error's fields, as every error from PostgreSQL is
 * reported: the status from the SQLSTATE (QX_ERR_DB without one), the message "primary
 * (detail)" or "primary", the SQLSTATE, retryable. Returns the status. */
QX_INTERNAL qx_status qx_error_server(qx_error *err, const char *sqlstate, const char *primary,
                                      const char *detail);

/* ---- the wire codec's password exchanges (wire_auth.c) ---------------------------------- */

/* md5: "md5" followed by md5hex(md5hex(password user) salt), 35 characters and a NUL. */
QX_INTERNAL int qx_md5_password(char out[36], const char *password, const char *user,
                                const unsigned char salt[4]);
/* SCRAM-SHA-256, no channel binding: first appends the client-first-message to first; continue
 * reads the server-first-message (len bytes) and appends the client-final-message to final;
 * final checks the server-final-message's signature (a wrong one is an error). */
typedef struct qx_scram qx_scram;
QX_INTERNAL qx_status qx_scram_first(qx_scram **out, qx_buf *first, qx_error *err);
QX_INTERNAL qx_status qx_scram_continue(qx_scram *s, const char *password, const char *msg,
                                        size_t len, qx_buf *final, qx_error *err);
QX_INTERNAL qx_status qx_scram_final(qx_scram *s, const char *msg, size_t len, qx_error *err);
/* 1 once the server's signature was checked. */
QX_INTERNAL int qx_scram_verified(const qx_scram *s);
/* Wipes and frees; NULL is harmless. */
QX_INTERNAL void qx_scram_free(qx_scram *s);

#endif
