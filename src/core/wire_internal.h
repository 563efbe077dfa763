/* What the wire codec's files (wire.c, wire_batch.c, wire_auth.c) share: the codec's state, the
 * message helpers, and what the connection and its batches call of each other. Not part of the
 * public header. */
#ifndef QX_WIRE_INTERNAL_H
#define QX_WIRE_INTERNAL_H

#include <string.h>

#include "internal.h"
#include "qx.h"

#define PROTOCOL_3_0 196608
#define MESSAGE_MAX (1 << 30)        /* a longer one is taken for garbage */
#define CACHE_MAX 384                /* distinct SQL texts prepared per connection */

enum { PH_NEW, PH_STARTUP, PH_READY };    /* the conversation */
enum { B_NONE, B_RUNNING, B_ENDED };      /* a batch: none, awaiting its end, ended */

typedef struct cached_stmt {
    char *sql;
    int prepared; /* the server has it */
    int dropped;  /* its Parse failed: the slot waits for a rebuild */
    char name[16];
} cached_stmt;

struct qx_wire {
    char *host, *user, *password, *dbname, *appname, *options;
    int port;

    qx_buf out, in;
    int out_secret; /* the output holds a password: wiped once sent */
    int phase, broken;
    const char *auth;
    char tx;        /* the last ReadyForQuery's status, 0 before one */
    int pid;
    char **params;  /* ParameterStatus: name, value, name, value, ... */
    int nparams;
    qx_scram *scram;

    cached_stmt *cache;
    int ncache;
    unsigned int next_id;
    qx_strmap map; /* SQL text -> index in cache */

    /* the batch */
    int bstate, n, keep, cur, skipping, copying;
    qx_result **results;
    int *parse; /* per statement: the cache index whose Parse it carries, or -1 */
    qx_result *partial;
    int prows;
    qx_status bstatus;
    int bfailed;
    qx_error berr;
};

/* ---- messages ---------------------------------------------------------------------------- */

static inline void put_i32(qx_buf *b, unsigned int v)
{
    unsigned char c[4] = { (unsigned char)(v >> 24), (unsigned char)(v >> 16),
                           (unsigned char)(v >> 8), (unsigned char)v };
    qx_buf_append(b, c, 4);
}

static inline void put_i16(qx_buf *b, unsigned int v)
{
    unsigned char c[2] = { (unsigned char)(v >> 8), (unsigned char)v };
    qx_buf_append(b, c, 2);
}

static inline void put_cstr(qx_buf *b, const char *s) { qx_buf_append(b, s, strlen(s) + 1); }

/* Begins a message of type t (0: the startup message, which has none); returns where its
 * length goes, for end_msg. */
static inline size_t begin_msg(qx_buf *b, char t)
{
    size_t at;
    if (t != 0)
        qx_buf_append(b, &t, 1);
    at = b->len;
    put_i32(b, 0);
    return at;
}

static inline void end_msg(qx_buf *b, size_t at)
{
    size_t n = b->len - at;
    if (b->failed)
        return;
    b->p[at] = (char)(n >> 24);
    b->p[at + 1] = (char)(n >> 16);
    b->p[at + 2] = (char)(n >> 8);
    b->p[at + 3] = (char)n;
}

static inline unsigned int get_u32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (unsigned int)u[0] << 24 | (unsigned int)u[1] << 16 | (unsigned int)u[2] << 8 | u[3];
}

static inline int get_i16(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (short)(u[0] << 8 | u[1]);
}

/* An authentication request (the body of an 'R' message) during start-up: answers it in the
 * output, or fails (QX_ERR_CONNECTION: a method not supported, no password, a server that does
 * not prove it knows the password). */
QX_INTERNAL qx_status qx_wire_authenticate(qx_wire *w, const char *body, size_t len,
                                           qx_error *err);

/* ---- the connection (wire.c) ------------------------------------------------------------- */

/* An ErrorResponse's fields (pointing into its body); severity is the non-localized one when
 * the server sends it. */
typedef struct server_error {
    const char *severity, *sqlstate, *primary, *detail;
} server_error;

/* Reads an ErrorResponse's body; 0 when it is malformed. */
QX_INTERNAL int qx_wire_parse_error(const char *body, size_t len, server_error *e);
/* 1 for a FATAL or PANIC: the server closes the connection. */
QX_INTERNAL int qx_wire_is_fatal(const server_error *e);
/* Keeps a ParameterStatus (QX_ERR_CONNECTION: malformed; QX_ERR_NOMEM). */
QX_INTERNAL qx_status qx_wire_parameter_status(qx_wire *w, const char *body, size_t len);
/* The codec cannot go on: broken, the batch (if one is running) ends with the error, fmt
 * formatting what; *done is set when the batch or the start-up ended. Returns s. */
QX_INTERNAL qx_status qx_wire_violation(qx_wire *w, int *done, qx_error *err, qx_status s,
                                        const char *fmt, const char *what);

/* ---- batches (wire_batch.c) -------------------------------------------------------------- */

/* Ends the running batch with the error fmt formatting why (unless it failed already), the
 * codec broken: its statements not yet parsed leave the cache. */
QX_INTERNAL void qx_wire_end_batch_lost(qx_wire *w, qx_status s, const char *fmt,
                                        const char *why);
/* A message while a batch runs: its replies; *done once it ended (ReadyForQuery, or a failure
 * that breaks the codec). */
QX_INTERNAL qx_status qx_wire_batch_message(qx_wire *w, char type, const char *body, size_t len,
                                            int *done, qx_error *err);

#endif
