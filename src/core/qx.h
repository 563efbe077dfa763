/*
 * qx core: the Lua-agnostic C half of qx.
 *
 * Conventions (after nats.c): every function that can fail returns a qx_status and fills its
 * out-parameters, which come first; objects have a _new/_open and a _free/_close that accepts
 * NULL; an optional qx_error receives the details of a failure.
 */
#ifndef QX_CORE_H
#define QX_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum qx_status {
    QX_OK = 0,
    QX_ERR_CONFLICT,   /* unique violation, serialization failure, deadlock */
    QX_ERR_NOT_FOUND,
    QX_ERR_INVALID,    /* bad input: data exceptions, constraint violations, bad arguments */
    QX_ERR_DB,         /* any other server error */
    QX_ERR_CONNECTION, /* cannot connect, connection lost */
    QX_ERR_TIMEOUT,    /* statement timeout, pool acquire timeout */
    QX_ERR_NATS,
    QX_ERR_NOMEM,
    QX_ERR_CLOSED,     /* the object was closed */
    QX_ERR_UNKNOWN_OUTCOME, /* a COMMIT's reply was lost: committed or not, the server knows */
    QX_PENDING         /* not an error: a transaction over a wire codec waits for the caller to
                        * move its bytes, then for qx_tx_resume */
} qx_status;

#define QX_ERR_MESSAGE_MAX 1024

typedef struct qx_error {
    qx_status status;
    int retryable;                    /* serialization failure / deadlock: run it again */
    char sqlstate[6];                 /* "" when not from the server */
    char message[QX_ERR_MESSAGE_MAX];
} qx_error;

/* The short name of a status: "conflict", "not_found", "invalid", "db", ... */
const char *qx_status_name(qx_status s);
/* Fills err (if not NULL) and returns s. */
qx_status qx_error_set(qx_error *err, qx_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void qx_error_clear(qx_error *err);
/* Maps a SQLSTATE to a status; sets *retryable for serialization failures and deadlocks. */
qx_status qx_status_from_sqlstate(const char *sqlstate, int *retryable);

/* ---- time and ids ------------------------------------------------------------------------ */

#define QX_UUID_STRLEN 36
#define QX_ISO8601_STRLEN 27 /* 2026-11-22T04:13:56.123456Z */

/* UUID v7 (RFC 9562): 48-bit Unix ms timestamp, then a 12-bit counter seeded at random each
 * millisecond so ids made within one millisecond by one process still sort in creation order,
 * then 62 random bits. buf receives 36 characters and a NUL. */
qx_status qx_uuid7(char buf[QX_UUID_STRLEN + 1], qx_error *err);
/* Checks the textual 8-4-4-4-12 form; returns 1 when valid. */
int qx_uuid_valid(const char *s, size_t len);
/* Current UTC time as ISO-8601 with microseconds. */
void qx_now_iso8601(char buf[QX_ISO8601_STRLEN + 1]);
/* The same for a time in nanoseconds since the epoch (a time before it, or after year 9999,
 * is written as the epoch). */
void qx_iso8601_from_ns(char buf[QX_ISO8601_STRLEN + 1], int64_t ns);
/* Reads an ISO-8601 time with its zone (YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)) as
 * nanoseconds since the epoch; anything else is QX_ERR_INVALID. */
qx_status qx_iso8601_parse(int64_t *ns, const char *s, qx_error *err);
/* Monotonic clock in seconds. */
double qx_clock(void);
/* Wall clock: seconds since the Unix epoch, with the fraction (span times). */
double qx_time(void);

/* W3C Trace Context syntax (trace.c): 1 when s[0, n) is a valid traceparent (version 00, or a
 * later one by the specification's rules) or tracestate (at most 32 key=value members, each
 * key once), else 0 and *why says what is wrong (a static string). */
int qx_traceparent_check(const char *s, size_t n, const char **why);
int qx_tracestate_check(const char *s, size_t n, const char **why);

/* SIGTERM/SIGINT while a command waits outside the relay's loop: watch(1) makes a signal set a
 * flag instead of ending the process (watch(0) puts the previous handlers back); sleep waits up
 * to timeout_ms or until a signal; both tell whether one was caught since watch(1). */
void qx_signals_watch(int on);
int qx_signals_caught(void);
int qx_signals_sleep(int timeout_ms);

/* ---- results ----------------------------------------------------------------------------- */

typedef struct qx_result qx_result;

int qx_result_nrows(const qx_result *r);
int qx_result_ncols(const qx_result *r);
const char *qx_result_colname(const qx_result *r, int col);
unsigned int qx_result_coltype(const qx_result *r, int col); /* PostgreSQL type OID */
int qx_result_isnull(const qx_result *r, int row, int col);
const char *qx_result_value(const qx_result *r, int row, int col);
int qx_result_length(const qx_result *r, int row, int col);
long long qx_result_affected(const qx_result *r); /* rows touched by INSERT/UPDATE/DELETE */
void qx_result_free(qx_result *r);

/* PostgreSQL type OIDs the binding converts. */
enum {
    QX_OID_BOOL = 16, QX_OID_BYTEA = 17, QX_OID_INT8 = 20, QX_OID_INT2 = 21, QX_OID_INT4 = 23,
    QX_OID_OID = 26, QX_OID_JSON = 114, QX_OID_FLOAT4 = 700, QX_OID_FLOAT8 = 701,
    QX_OID_NUMERIC = 1700, QX_OID_JSONB = 3802
};

/* Decodes a bytea text value ("\x...") into a new buffer the caller frees with qx_free. */
qx_status qx_bytea_decode(unsigned char **out, size_t *outlen, const char *text, qx_error *err);
void qx_free(void *p);

/* ---- connections ------------------------------------------------------------------------- */

typedef struct qx_conn qx_conn;

/* A statement for qx_conn_batch: SQL with $1..$n and n text parameters (NULL = SQL NULL). */
typedef struct qx_stmt {
    const char *sql;
    int nparams;
    const char *const *values;
    const int *lengths; /* may be NULL: values are NUL-terminated */
} qx_stmt;

typedef enum qx_tx_status {
    QX_TX_IDLE, QX_TX_ACTIVE, QX_TX_INTRANS, QX_TX_INERROR, QX_TX_UNKNOWN, QX_TX_BAD
} qx_tx_status;
/* "idle", "active", "intrans", "inerror", "unknown", "bad" (conn:status, wire:tx_status) */
const char *qx_tx_status_name(qx_tx_status s);

/* Opens a connection from a libpq conninfo string or URL. connect_timeout_ms > 0 bounds the
 * attempt (libpq counts whole seconds, at least 2). */
qx_status qx_conn_open(qx_conn **out, const char *conninfo, int connect_timeout_ms,
                       qx_error *err);
void qx_conn_close(qx_conn *c);

/* Sends every statement in one pipelined round trip, preparing each distinct SQL text once per
 * connection, and collects one result per statement into results[0..n-1] (the caller frees each
 * with qx_result_free). On failure, *failed receives the index of the statement that failed
 * (or -1 when the failure is not tied to one), the results are all freed and set to NULL, and the
 * statements after the failed one did not run. */
qx_status qx_conn_batch(qx_conn *c, qx_result **results, int *failed, const qx_stmt *stmts,
                        int n, qx_error *err);
/* As qx_conn_batch, except that on failure the results of the statements that completed before
 * it are kept in results[] (the caller frees them): what a lost COMMIT leaves to go on. */
qx_status qx_conn_batch_keep(qx_conn *c, qx_result **results, int *failed, const qx_stmt *stmts,
                             int n, qx_error *err);
/* One statement (a batch of one). */
qx_status qx_conn_exec(qx_conn *c, qx_result **result, const char *sql, int nparams,
                       const char *const *values, const int *lengths, qx_error *err);
/* Runs SQL text with the simple protocol: several statements, no parameters (migrations). */
qx_status qx_conn_script(qx_conn *c, const char *sql, qx_error *err);

qx_tx_status qx_conn_tx_status(const qx_conn *c);
int qx_conn_pid(const qx_conn *c);
int qx_conn_socket(const qx_conn *c);
int qx_conn_is_broken(const qx_conn *c);
/* Cheap health check of an idle connection (no round trip): 1 when it looks usable. */
int qx_conn_check(qx_conn *c);
double qx_conn_created_at(const qx_conn *c); /* qx_clock() when it was opened */

/* LISTEN/NOTIFY. qx_conn_listen quotes the channel as an identifier. */
qx_status qx_conn_listen(qx_conn *c, const char *channel, qx_error *err);
typedef struct qx_notify {
    char *channel;
    char *payload;
    int pid;
} qx_notify;
/* Waits up to timeout_ms (0 = just check, < 0 = forever) for notifications; *out receives an
 * array of *count notifications to free with qx_notify_free (NULL and 0 on timeout). */
qx_status qx_conn_notifications(qx_conn *c, qx_notify **out, int *count, int timeout_ms,
                                qx_error *err);
void qx_notify_free(qx_notify *n, int count);
/* Stops listening on every channel (UNLISTEN *) and drops notifications not yet read; nothing
 * when the connection never listened. The pool does it before taking a connection back. */
qx_status qx_conn_unlisten(qx_conn *c, qx_error *err);

/* ---- the wire codec (wire.c): PostgreSQL's protocol without I/O of its own -------------------
 *
 * For event loops that own the socket (nginx cosockets), where libpq cannot be driven: the codec
 * turns start-up and batches into bytes to send and the bytes received into results, and the
 * caller moves the bytes. A batch runs as qx_conn_batch runs it (the extended protocol, each
 * distinct SQL text prepared once per connection, one Sync), so a qx_tx runs over either.
 * Authentication: trust, password (cleartext), md5 and SCRAM-SHA-256 (no channel binding); no
 * TLS (sslmode disable, allow or prefer; require and stronger are refused).
 *
 * The conversation: qx_wire_start queues the startup message; the caller sends qx_wire_output,
 * calls qx_wire_sent, receives, and passes what came to qx_wire_feed, sending any output the feed
 * queued (authentication answers), until the feed says done. A batch is the same: qx_wire_batch
 * queues it, the caller moves bytes until done, qx_wire_batch_end gives its outcome. */
typedef struct qx_wire qx_wire;

/* conninfo: a libpq URL or key=value string; what it leaves out comes from libpq's defaults and
 * environment (PGUSER, PGPASSWORD, PGDATABASE, ...; no password file is read). Of several hosts
 * and ports the first is taken (hostaddr before host); no host is libpq's default socket
 * directory. application_name defaults to "qx", as for qx_conn_open. A string libpq cannot
 * read, or sslmode require, verify-ca or verify-full, is QX_ERR_INVALID. Nothing is sent. */
qx_status qx_wire_new(qx_wire **out, const char *conninfo, qx_error *err);
void qx_wire_free(qx_wire *w);
/* Where to connect: a host name or address, or (beginning with '/') the directory of a Unix
 * socket, whose file is .s.PGSQL.<port>. */
const char *qx_wire_host(const qx_wire *w);
int qx_wire_port(const qx_wire *w);
/* Begins the conversation on a new socket: forgets the statements prepared on an earlier one,
 * drops pending output and queues the startup message. */
void qx_wire_start(qx_wire *w);
/* The bytes to send (NULL and 0 when none); all of them, then qx_wire_sent. */
const char *qx_wire_output(const qx_wire *w, size_t *len);
void qx_wire_sent(qx_wire *w);
/* Bytes received, any amount (a message may span calls). *done is 1 once what was awaited has
 * come: the end of start-up, or the ReadyForQuery that ends a batch. A failed start-up
 * (authentication refused, a method not supported, the server's error) or a protocol violation
 * returns its error and leaves the codec broken; during a batch a protocol violation also ends
 * the batch (*done is 1 and qx_wire_batch_end reports it too). What only ends the batch (the
 * server's FATAL, COPY FROM STDIN, which also leave the codec broken) is said by
 * qx_wire_batch_end alone: the feed returns QX_OK and done. Bytes after the message that ends
 * what was awaited are kept for the next feed. */
qx_status qx_wire_feed(qx_wire *w, const char *data, size_t len, int *done, qx_error *err);
/* The caller's I/O failed (closed, timed out, reset): the codec is broken; a batch in progress
 * ends with QX_ERR_CONNECTION and why. */
void qx_wire_lost(qx_wire *w, const char *why);
/* Queues a batch (the texts are copied: the caller keeps nothing but results, which receives
 * one result per statement when it ends). keep: as qx_conn_batch_keep. QX_ERR_CONNECTION when
 * broken, QX_ERR_INVALID when start-up is not done or another batch is in progress (one whose
 * qx_wire_batch_end has not been called). A batch of no statements is a Sync alone: a round
 * trip all the same. Freeing the codec before qx_wire_batch_end frees the results it made (the
 * results array must still be there). */
qx_status qx_wire_batch(qx_wire *w, qx_result **results, const qx_stmt *stmts, int n, int keep,
                        qx_error *err);
/* Once the feed said done, or after qx_wire_lost: the batch's outcome, as qx_conn_batch or
 * qx_conn_batch_keep reports it (same statuses, messages, *failed and freeing of results). */
qx_status qx_wire_batch_end(qx_wire *w, int *failed, qx_error *err);
/* 1 while a batch waits for its end (queued, sent or partly answered), and after it until
 * qx_wire_batch_end. */
int qx_wire_busy(const qx_wire *w);
/* 1 once the batch in progress has ended (its reply came, or the conversation was lost):
 * qx_wire_batch_end may be called. */
int qx_wire_batch_done(const qx_wire *w);
int qx_wire_is_broken(const qx_wire *w);
/* 1 once start-up is done and the codec is neither broken nor busy. */
int qx_wire_ready(const qx_wire *w);
/* From the last ReadyForQuery (QX_TX_UNKNOWN before one); QX_TX_BAD when broken,
 * QX_TX_ACTIVE while a batch awaits its end. */
qx_tx_status qx_wire_tx_status(const qx_wire *w);
int qx_wire_pid(const qx_wire *w);
/* "trust", "password", "md5" or "scram-sha-256" once start-up is done; "" before. */
const char *qx_wire_auth(const qx_wire *w);
/* The last value the server reported for a run-time parameter (ParameterStatus: server_version,
 * client_encoding, TimeZone, ...), or NULL. */
const char *qx_wire_parameter(const qx_wire *w, const char *name);

/* ---- transactions (tx.c) ------------------------------------------------------------------ */

/* One transaction on a leased connection, sent as few round trips as it can be: statements are
 * queued (their SQL and parameter texts copied, so the caller keeps nothing) and leave with the
 * next read, flush or the commit, in one pipeline. BEGIN (and the SET LOCAL statement_timeout of
 * options.timeout_ms) lead the first pipeline. A transaction that has sent nothing and needs no
 * block commits its whole queue as one implicit transaction, without BEGIN or COMMIT. LOCK,
 * DECLARE, SAVEPOINT and RELEASE need a block. The first failure poisons the transaction: every
 * later call returns that error, and only a rollback (or going back to a savepoint that reached
 * the server) remains. The tx does not own the connection: its owner releases it. */
typedef struct qx_tx qx_tx;

typedef struct qx_tx_options {
    int timeout_ms; /* >= 0: SET LOCAL statement_timeout for this transaction; -1 (default):
                     * the connection's own */
} qx_tx_options;

typedef enum qx_tx_state {
    QX_TXS_ACTIVE, QX_TXS_FAILED, QX_TXS_COMMITTED, QX_TXS_ROLLED_BACK
} qx_tx_state;

void qx_tx_options_init(qx_tx_options *o);
qx_status qx_tx_new(qx_tx **out, qx_conn *c, const qx_tx_options *o, qx_error *err);
/* The same transaction over a wire codec (the caller owns the socket): every call that would
 * make a round trip queues its pipeline in the codec and returns QX_PENDING instead; the caller
 * moves the bytes until the codec is done (or lost), then qx_tx_resume finishes the call and
 * gives what it would have given. Until then every other call is QX_ERR_INVALID. */
qx_status qx_tx_new_wire(qx_tx **out, qx_wire *w, const qx_tx_options *o, qx_error *err);
/* Finishes the call that returned QX_PENDING: its status, and *out (qx_tx_query's result) and
 * *wake_failed (qx_tx_commit's) where that call has them (either may be NULL otherwise). */
qx_status qx_tx_resume(qx_tx *tx, qx_result **out, int *wake_failed, qx_error *err);
/* 1 while a call waits for qx_tx_resume. */
int qx_tx_pending(const qx_tx *tx);
/* The connection or codec under tx was closed (qx_wire_free frees a pending batch's results):
 * the tx forgets it and any call waiting on it, so that qx_tx_free touches neither. */
void qx_tx_forget_connection(qx_tx *tx);
void qx_tx_free(qx_tx *tx);
/* Queues a statement (no round trip). */
qx_status qx_tx_queue(qx_tx *tx, const qx_stmt *s, qx_error *err);
/* Queues, in place of a statement that could not be made (a parameter that cannot be sent),
 * its error: the send that would carry it fails with it before any of its statements leaves,
 * unless a rollback to a savepoint queued before it drops it first. */
qx_status qx_tx_queue_failure(qx_tx *tx, const qx_error *why);
/* Queues a statement whose result's first row is the transaction's id and the server's timeline
 * (text; QX_TX_ID_COLUMNS reads them, e.g. as RETURNING columns of a write): a commit whose
 * pipeline carries it sends no statement of its own to learn them, one statement less. */
#define QX_TX_ID_COLUMNS                                                                          \
    "pg_current_xact_id()::text, CASE WHEN pg_is_in_recovery() THEN NULL "                       \
    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END"
qx_status qx_tx_queue_id(qx_tx *tx, const qx_stmt *s, qx_error *err);
/* Sends the queue and s in one round trip; *out receives s's result (free it). */
qx_status qx_tx_query(qx_tx *tx, qx_result **out, const qx_stmt *s, qx_error *err);
/* Sends the queue (begins the transaction when nothing was sent yet). */
qx_status qx_tx_flush(qx_tx *tx, qx_error *err);
/* Savepoints nest: savepoint queues SAVEPOINT, release queues RELEASE of the innermost one;
 * rollback_to goes back to the innermost one and forgets it: when nothing was sent since it was
 * queued, by dropping what was queued since (no round trip), otherwise with ROLLBACK TO, which
 * also clears a failure that happened after it. */
qx_status qx_tx_savepoint(qx_tx *tx, qx_error *err);
qx_status qx_tx_release(qx_tx *tx, qx_error *err);
qx_status qx_tx_rollback_to(qx_tx *tx, qx_error *err);
/* Sends the queue and COMMIT, then wakes the listeners of channels (pg_notify in a transaction
 * of its own, synchronous_commit off), all in one round trip. Nothing queued and nothing sent:
 * no round trip. When only the wake-up fails, the transaction committed: QX_OK with *wake_failed
 * = 1 and its error in err. */
qx_status qx_tx_commit(qx_tx *tx, int *wake_failed, const char *const *channels, int nchannels,
                       qx_error *err);
/* A COMMIT whose reply is lost (the connection failed after the COMMIT, or before its reply, may
 * have reached the server) is QX_ERR_UNKNOWN_OUTCOME: the transaction's id and the server's
 * timeline, learned in the same pipeline before the COMMIT, let a fresh connection ask
 * (qx_xact_status). A transaction that wrote nothing has no id: its lost reply stays
 * QX_ERR_CONNECTION (nothing was kept either way), and so does a failure the server reported
 * on a statement before the COMMIT. */
/* The id ("" when unknown: none assigned, or its reply lost too) and timeline ("" when unknown)
 * of the transaction, learned by its commit. */
const char *qx_tx_xid(const qx_tx *tx);
const char *qx_tx_timeline(const qx_tx *tx);

typedef enum qx_xact {
    QX_XACT_COMMITTED, QX_XACT_ABORTED, QX_XACT_IN_PROGRESS, QX_XACT_UNKNOWN
} qx_xact;
/* What became of transaction xid (pg_xact_status), asked on connection c. timeline (NULL or ""
 * for any) is where the id was learned: a server on another timeline (a promoted standby can
 * hand the same id to another transaction) answers QX_XACT_UNKNOWN, and so does an id too old
 * for the server to remember. */
qx_status qx_xact_status(qx_xact *out, qx_conn *c, const char *xid, const char *timeline,
                         qx_error *err);
/* What qx_xact_status asks ($1: the id as text): the status and the server's timeline, columns
 * status and timeline, for a connection that asks itself (the wire codec's). */
#define QX_XACT_STATUS_SQL                                                                        \
    "SELECT pg_xact_status($1::xid8) AS status, CASE WHEN pg_is_in_recovery() THEN NULL "        \
    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END AS timeline"
/* The wake-up a commit sends after its COMMIT: QX_WAKE_SQL_HEAD, ", pg_notify($n, '')" per
 * channel, QX_WAKE_SQL_TAIL (synchronous_commit off: it does not wait for its commit record to
 * reach the disk; the statement returns no row and no column). */
#define QX_WAKE_SQL_HEAD "SELECT FROM (SELECT set_config('synchronous_commit', 'off', true)"
#define QX_WAKE_SQL_TAIL " OFFSET 1) AS s"
const char *qx_xact_name(qx_xact x);
/* Rolls back what was sent (nothing when nothing was); the transaction is finished either way. */
qx_status qx_tx_rollback(qx_tx *tx, qx_error *err);
qx_tx_state qx_tx_state_of(const qx_tx *tx);
/* How many statements wait for the next send (BEGIN and the timeout not counted). */
int qx_tx_queued(const qx_tx *tx);
/* Round trips made so far, and the SQL texts of the last one (valid until the next call that
 * queues or sends): what a test or a trace needs to see of the pipelining. */
long long qx_tx_round_trips(const qx_tx *tx);
int qx_tx_last_sent(const qx_tx *tx, const char **texts, int max);

/* ---- pool -------------------------------------------------------------------------------- */

typedef struct qx_pool qx_pool;

typedef struct qx_pool_options {
    const char *conninfo;
    int size;               /* most connections open at once (>= 1) */
    int acquire_timeout_ms; /* how long acquire waits for a free connection */
    int recycle_ms;         /* close connections older than this on acquire; 0 = never */
    int connect_timeout_ms;
    const char *init_sql;   /* run once on each new connection (e.g. SET statement_timeout); NULL */
} qx_pool_options;

void qx_pool_options_init(qx_pool_options *o);
/* Opens no connection yet; checks the options. */
qx_status qx_pool_new(qx_pool **out, const qx_pool_options *o, qx_error *err);
/* The pool of the process shared under name: made by the first call, the same pool (counted)
 * for every later one with the same conninfo and size (other values are QX_ERR_INVALID).
 * Each holder frees it with qx_pool_free; the last one closes it. Never call qx_pool_close
 * on a shared pool: it would close it for every holder. */
qx_status qx_pool_shared(qx_pool **out, const char *name, const qx_pool_options *o,
                         qx_error *err);
/* Closes idle connections; leased ones are closed when released. Safe to call twice. */
void qx_pool_close(qx_pool *p);
/* Frees the pool once it is closed and nothing is leased (closing it first); for a shared
 * pool, drops this holder, and only the last one closes and frees it. */
void qx_pool_free(qx_pool *p);
/* Leases a connection: an idle healthy one, else a new one while under size, else waits up to
 * acquire_timeout_ms. Broken and over-age connections are replaced. */
qx_status qx_pool_acquire(qx_pool *p, qx_conn **out, qx_error *err);
/* Returns a connection. One left inside a transaction is rolled back first; a broken one is
 * closed. */
void qx_pool_release(qx_pool *p, qx_conn *c);

typedef struct qx_pool_stats {
    int size, open, idle, in_use, waiting;
    long long created, replaced;
} qx_pool_stats;
void qx_pool_stats_get(qx_pool *p, qx_pool_stats *s);

/* ---- folders (dir.c) --------------------------------------------------------------------- */

/* The names of the regular files in the folder at path, in no order, without those that start
 * with "."; free them with qx_dir_list_free. A missing folder is QX_ERR_NOT_FOUND, one that cannot
 * be read QX_ERR_INVALID. */
qx_status qx_dir_list(char ***names, size_t *count, const char *path, qx_error *err);
void qx_dir_list_free(char **names, size_t count);

/* ---- signing (crypto.c): cursors and other opaque tokens ------------------------------- */

#define QX_HMAC_SHA256_LEN 32

/* HMAC-SHA256 of data under key (OpenSSL libcrypto); out receives 32 bytes. */
qx_status qx_hmac_sha256(unsigned char out[QX_HMAC_SHA256_LEN], const void *key, size_t keylen,
                         const void *data, size_t len, qx_error *err);
#define QX_SHA256_LEN 32

/* SHA-256 digest of data (OpenSSL libcrypto); out receives 32 bytes. Checksums of migration
 * files. */
qx_status qx_sha256(unsigned char out[QX_SHA256_LEN], const void *data, size_t len, qx_error *err);
/* 1 when the len bytes at a and b are equal; the time taken does not depend on where they
 * differ. */
int qx_equal_consttime(const void *a, const void *b, size_t len);
/* Unpadded base64url (RFC 4648 section 5). qx_b64url_encode writes qx_b64url_encoded_len(n)
 * characters and a NUL. qx_b64url_decode is strict (alphabet only, no padding, canonical last
 * character) and writes at most n * 3 / 4 bytes to out. */
size_t qx_b64url_encoded_len(size_t n);
void qx_b64url_encode(char *out, const unsigned char *in, size_t n);
qx_status qx_b64url_decode(unsigned char *out, size_t *outlen, const char *in, size_t n,
                           qx_error *err);

/* ---- sealing (crypto.c): AES-256-GCM ------------------------------------------------------
 * A sealed value is nonce (12 random bytes) || ciphertext || tag (16 bytes); the additional
 * authenticated data (aad) is bound to it: opening under another aad fails. */
#define QX_AEAD_KEY_LEN 32
#define QX_AEAD_NONCE_LEN 12
#define QX_AEAD_TAG_LEN 16
#define QX_AEAD_OVERHEAD (QX_AEAD_NONCE_LEN + QX_AEAD_TAG_LEN)
/* n random bytes from OpenSSL's generator (RAND_bytes). */
qx_status qx_random_bytes(unsigned char *out, size_t n, qx_error *err);
/* Writes len + QX_AEAD_OVERHEAD bytes to out: a fresh nonce, the ciphertext and the tag. */
qx_status qx_aead_seal(unsigned char *out, const unsigned char key[QX_AEAD_KEY_LEN],
                       const void *aad, size_t aadlen, const void *plain, size_t len,
                       qx_error *err);
/* Writes len - QX_AEAD_OVERHEAD bytes to out and sets *outlen. QX_ERR_INVALID when the sealed
 * bytes are too short, or were not sealed under this key and aad, or were changed: nothing of
 * them is trusted then (out may hold garbage and must not be used). */
qx_status qx_aead_open(unsigned char *out, size_t *outlen,
                       const unsigned char key[QX_AEAD_KEY_LEN], const void *aad, size_t aadlen,
                       const void *sealed, size_t len, qx_error *err);
/* A key made ready for opening many values (its context and key schedule set up once): one
 * thread at a time. qx_aead_key_open is qx_aead_open under it; free cleanses it. */
typedef struct qx_aead_key qx_aead_key;
qx_aead_key *qx_aead_key_new(const unsigned char key[QX_AEAD_KEY_LEN], qx_error *err);
qx_status qx_aead_key_open(qx_aead_key *k, unsigned char *out, size_t *outlen, const void *aad,
                           size_t aadlen, const void *sealed, size_t len, qx_error *err);
void qx_aead_key_free(qx_aead_key *k);
/* Sealed values (personal fields): "<prefix><subject id>:<base64url(sealed bytes)>", sealed
 * under the AAD head .. id .. "\n" .. field (lua/qx/store/personal.lua names the prefix and
 * head). qx_sealed_kind: 0 when s (n bytes) does not begin with prefix, 1 when a subject id (a
 * uuid, checked when check_subject) and ':' follow it, -1 when they do not (malformed). */
#define QX_SEALED_SUBJECT_LEN 36
int qx_sealed_kind(const char *s, size_t n, const char *prefix, size_t plen, int check_subject);
/* The bytes of scratch qx_sealed_open needs for a sealed text of n bytes. */
size_t qx_sealed_buf_len(size_t hlen, size_t idlen, size_t klen, size_t n);
/* Opens the sealed text (n bytes, of kind 1 under a prefix of plen bytes) under k, bound to
 * head .. id .. "\n" .. field, in buf (qx_sealed_buf_len bytes): *plain points into buf. */
qx_status qx_sealed_open(qx_aead_key *k, const char *head, size_t hlen, const char *id,
                         size_t idlen, const char *field, size_t klen, const char *text, size_t n,
                         size_t plen, unsigned char *buf, const unsigned char **plain,
                         size_t *plain_len, qx_error *err);

/* Keyset cursors: token = base64url(frame) "." base64url(HMAC-SHA256(key, QX_CURSOR_DOMAIN
 * context "\n" base64url(frame))), the frame holding the values one after another, each the
 * byte 0 (null) or the byte 1, a 4-byte big-endian length and the bytes. The context names the
 * listing the cursor belongs to; nothing of a token is read before its MAC is checked. */
#define QX_CURSOR_DOMAIN "qx.cursor.v2\n"
#define QX_CURSOR_MAX 4096       /* longest token opened */
#define QX_CURSOR_MAX_VALUES 64
#define QX_CURSOR_MAX_KEYS 16
typedef struct qx_cursor_value {
    const char *ptr; /* NULL: a null value */
    size_t len;
} qx_cursor_value;
/* Length of the token qx_cursor_seal makes of these values (without a NUL). */
size_t qx_cursor_sealed_len(const qx_cursor_value *v, int n);
/* Writes the token (qx_cursor_sealed_len bytes and a NUL) to out. */
qx_status qx_cursor_seal(char *out, const void *key, size_t keylen, const char *context,
                         size_t contextlen, const qx_cursor_value *v, int n, qx_error *err);
/* Checks the token's MAC under each of the keys (constant-time comparison), then reads exactly
 * n values into v, which point into frame (room for tokenlen bytes). QX_ERR_INVALID, with the
 * reason as the message, for a token that is too long, malformed, not signed by any of the keys
 * for this context, or does not hold n values. */
qx_status qx_cursor_open(qx_cursor_value *v, int n, unsigned char *frame, const char *token,
                         size_t tokenlen, const void *const *keys, const size_t *keylens,
                         int nkeys, const char *context, size_t contextlen, qx_error *err);

/* ---- NATS (natsconn.c): one connection to NATS with JetStream -------------------------- */

/* A NATS connection and its JetStream context (nats.c underneath). Publishers, relays and
 * consumers of a process share one. It is reference counted: qx_nats_open returns it with one
 * reference, qx_nats_retain adds one (a relay or a consumer keeps the connection alive after
 * its opener closed it), qx_nats_close drops one and closes the connection with the last. */
typedef struct qx_nats qx_nats;

typedef struct qx_nats_options {
    const char *servers;      /* comma-separated nats:// urls */
    const char *name;         /* client name the server shows */
    const char *user, *password, *token, *creds_file;
    const char *tls_ca, *tls_cert, *tls_key; /* PEM files; tls_cert and tls_key go together */
    int tls;                  /* 1: require TLS (implied by tls_ca / tls_cert) */
    int connect_timeout_ms;   /* per server, > 0 */
    int reconnect_attempts;   /* after a lost connection; -1 = forever, 0 = never */
    int reconnect_wait_ms;    /* between two attempts on the same server */
    int ping_interval_ms;     /* a PING this often, > 0 */
    int max_pings_out;        /* unanswered PINGs after which the server counts as gone, > 0:
                               * a dead or frozen server is noticed within about
                               * ping_interval_ms * (max_pings_out + 1) and the next is tried */
    int send_asap;            /* 1 (default): each message goes out at once; 0: nats.c gathers
                               * writes for up to 1 ms (bulk throughput, a millisecond later) */
} qx_nats_options;

/* Defaults: servers nats://127.0.0.1:4222, connect 2000 ms, reconnect forever every 2000 ms,
 * a PING every 2000 ms with at most 2 unanswered, send_asap. */
void qx_nats_options_init(qx_nats_options *o);
/* Connects; an unreachable server is QX_ERR_CONNECTION within the connect timeout. */
qx_status qx_nats_open(qx_nats **out, const qx_nats_options *o, qx_error *err);
qx_nats *qx_nats_retain(qx_nats *n);
void qx_nats_close(qx_nats *n);

typedef enum qx_nats_state {
    QX_NATS_CONNECTED, QX_NATS_CONNECTING, QX_NATS_RECONNECTING, QX_NATS_DISCONNECTED,
    QX_NATS_CLOSED
} qx_nats_state;
qx_nats_state qx_nats_get_state(qx_nats *n);
const char *qx_nats_state_name(qx_nats_state s); /* "connected", "reconnecting", ... */
/* How many times the connection was re-established since it was opened. */
long long qx_nats_reconnects(qx_nats *n);
/* The url of the server it is connected to ("" when not connected). */
void qx_nats_connected_url(qx_nats *n, char *buf, size_t size);

/* 1 when s is a subject a message can be published to: dot-separated non-empty tokens of
 * printable characters without whitespace, no wildcard tokens. */
int qx_nats_subject_valid(const char *s);

typedef struct qx_nats_stream_options {
    const char *name;
    const char *const *subjects;
    int nsubjects;
    int64_t duplicate_window_ms; /* <= 0: the server's default (2 minutes) */
    int replicas;                /* <= 0: 1; more needs a JetStream cluster */
    int32_t max_msg_size;        /* <= 0: no limit of the stream's own */
} qx_nats_stream_options;

/* Creates the file-backed stream, or updates its subjects, duplicate window and message size
 * when it exists with others (a stream's replicas can change only where the server allows).
 * For development and tests: deployments declare their streams. */
qx_status qx_nats_ensure_stream(qx_nats *n, const qx_nats_stream_options *o, qx_error *err);

typedef struct qx_nats_stream_info {
    uint64_t messages, bytes, first_seq, last_seq;
    int64_t consumers, subjects;
} qx_nats_stream_info;
/* QX_ERR_NOT_FOUND when there is no such stream. */
qx_status qx_nats_stream_info_get(qx_nats *n, qx_nats_stream_info *out, const char *name,
                                  qx_error *err);
/* A message stored in a stream, read back by sequence (tests, tools). */
typedef struct qx_nats_stored {
    uint64_t sequence;
    char *subject;
    char *data;
    int len;
    int nheaders;
    char **keys, **values; /* the first value of each header */
} qx_nats_stored;
/* QX_ERR_NOT_FOUND when the stream has no message at seq (deleted, or beyond the last). */
qx_status qx_nats_stream_get(qx_nats *n, qx_nats_stored **out, const char *stream,
                             uint64_t seq, qx_error *err);
void qx_nats_stored_free(qx_nats_stored *m);
/* Deletes a stream (tests); QX_ERR_NOT_FOUND when there is none. */
qx_status qx_nats_delete_stream(qx_nats *n, const char *name, qx_error *err);

typedef struct qx_nats_header {
    const char *key, *value;
} qx_nats_header;

#define QX_NATS_STREAM_NAME_MAX 256
typedef struct qx_nats_ack {
    char stream[QX_NATS_STREAM_NAME_MAX];
    uint64_t sequence;
    int duplicate; /* JetStream already had a message with this msg_id (within its window) */
} qx_nats_ack;

/* Publishes one message to JetStream and waits for its ack (up to timeout_ms; <= 0: 5000).
 * msg_id (may be NULL) becomes the Nats-Msg-Id header, JetStream's de-duplication key.
 * A server that does not ack in time is QX_ERR_TIMEOUT; a rejection (no stream for the subject,
 * limits) is QX_ERR_NATS. */
qx_status qx_nats_publish(qx_nats *n, qx_nats_ack *ack, const char *subject, const void *data,
                          size_t len, const qx_nats_header *headers, int nheaders,
                          const char *msg_id, int timeout_ms, qx_error *err);

/* ---- JetStream pull consumer ------------------------------------------------------------- */

/* A durable pull consumer on a stream. Fetching waits on the calling thread (no callbacks).
 * Each fetched message is an object of its own: valid until its holder frees it, also after
 * later fetches and after the consumer is closed (it then can no longer be answered), and
 * answered once: ack, nak (optionally delayed) or term. A message left unanswered is
 * redelivered by the server once its ack wait has passed. A consumer and its messages are used
 * from one thread at a time. */
typedef struct qx_consumer qx_consumer;
typedef struct qx_consumer_msg qx_consumer_msg;

typedef enum qx_deliver {
    QX_DELIVER_ALL = 0,       /* the whole stream */
    QX_DELIVER_NEW,           /* only messages stored after the durable is created */
    QX_DELIVER_FROM_SEQUENCE, /* from a stream sequence on */
    QX_DELIVER_FROM_TIME      /* from the first message stored at or after a time */
} qx_deliver;

typedef struct qx_consumer_options {
    const char *stream;         /* required; the stream must exist */
    const char *durable;        /* required; the consumer's name (no '.', ' ', '*', '>') */
    const char *filter_subject; /* NULL or "": every subject of the stream */
    int64_t max_deliver;        /* server-side delivery limit; <= 0: unlimited (default -1) */
    int ack_wait_ms;            /* redelivery after this long without a reply (default 30000) */
    int max_ack_pending;        /* unanswered messages the server lets out (default 1000) */
    int create;                 /* 1 (default): create the durable, or update it to these
                                   options; 0: bind to a consumer the deployment declared */
    qx_deliver deliver;         /* where a durable starts when it is created (default
                                   QX_DELIVER_ALL); an existing durable keeps its position */
    uint64_t start_sequence;    /* QX_DELIVER_FROM_SEQUENCE: the first stream sequence */
    int64_t start_time_ns;      /* QX_DELIVER_FROM_TIME: nanoseconds since the epoch */
} qx_consumer_options;

void qx_consumer_options_init(qx_consumer_options *o);
/* Declares (see create) and binds to the durable consumer. */
qx_status qx_consumer_new(qx_consumer **out, qx_nats *nats, const qx_consumer_options *o,
                          qx_error *err);
/* Drops this client's interest (the durable consumer and its state stay on the server) and the
 * NATS connection; the memory goes with the last of its messages. */
void qx_consumer_free(qx_consumer *c);
/* Fetches up to batch messages, waiting up to timeout_ms when none are ready. *msgs receives an
 * array of *count messages: the caller frees each with qx_consumer_msg_free and the array with
 * qx_free (NULL and 0 when nothing arrived in time: not an error; also while the connection is
 * being re-established). A closed connection is QX_ERR_CLOSED at once; any other failure is
 * reported when timeout_ms has passed, so a loop around fetch never spins. */
qx_status qx_consumer_fetch(qx_consumer *c, qx_consumer_msg ***msgs, int *count, int batch,
                            int timeout_ms, qx_error *err);
/* Frees a message; unanswered, it is redelivered after the ack wait. NULL is fine. */
void qx_consumer_msg_free(qx_consumer_msg *m);

/* What a message says about itself. The strings belong to the message. */
typedef struct qx_consumer_msg_info {
    const char *subject;
    const char *data; /* not NUL-terminated in general: use data_len */
    int data_len;
    const char *stream;
    const char *consumer;
    uint64_t stream_seq;
    uint64_t consumer_seq;
    uint64_t delivered;  /* 1 on the first delivery */
    uint64_t pending;    /* messages still waiting for this consumer after this one */
    int64_t timestamp_ns; /* when the stream stored it, ns since the epoch */
    char published_at[QX_ISO8601_STRLEN + 1]; /* the same as ISO-8601 UTC */
    int replied;         /* 1 once acked, naked or termed */
} qx_consumer_msg_info;
void qx_consumer_msg_info_get(const qx_consumer_msg *m, qx_consumer_msg_info *out);
int qx_consumer_msg_replied(const qx_consumer_msg *m);
/* The headers: *count keys and their (first) values; the strings belong to the message, the
 * two arrays to the caller (qx_free each; NULL when there are no headers). */
qx_status qx_consumer_msg_headers(qx_consumer_msg *m, const char ***keys, const char ***values,
                                  int *count, qx_error *err);

typedef enum qx_reply {
    QX_REPLY_ACK,         /* done */
    QX_REPLY_ACK_SYNC,    /* done, and wait for the server to confirm */
    QX_REPLY_NAK,         /* redeliver after delay_ms (0: at once) */
    QX_REPLY_TERM,        /* never redeliver */
    QX_REPLY_IN_PROGRESS  /* still working: restart the ack wait (not a final reply) */
} qx_reply;
/* Answers the message; a second final reply is QX_ERR_INVALID, a reply after the consumer was
 * closed QX_ERR_CLOSED. */
qx_status qx_consumer_msg_reply(qx_consumer_msg *m, qx_reply kind, int64_t delay_ms,
                                qx_error *err);

typedef struct qx_consumer_info {
    uint64_t num_pending;        /* messages not yet delivered */
    int64_t num_ack_pending;     /* delivered, not yet answered */
    int64_t num_redelivered;
    int64_t num_waiting;         /* pull requests waiting */
    uint64_t delivered_stream_seq;
    uint64_t ack_floor_stream_seq;
    int64_t max_deliver;
    int64_t ack_wait_ms;
    int64_t max_ack_pending;
} qx_consumer_info;
/* Asks the server for the consumer's state. */
qx_status qx_consumer_info_get(qx_consumer *c, qx_consumer_info *out, qx_error *err);
const char *qx_consumer_stream(const qx_consumer *c);
const char *qx_consumer_durable(const qx_consumer *c);

/* ---- outbox relay (relay.c): qx_outbox_events -> JetStream ------------------------------ */

/* Publishes committed outbox rows to JetStream. Each batch, in one transaction on one of the
 * relay's two PostgreSQL connections: claim up to batch_size pending rows of its shard (FOR
 * UPDATE SKIP LOCKED, commit order), publish them asynchronously within a window of
 * max_in_flight unacked messages (Nats-Msg-Id = event id), mark the acked rows published in one
 * statement and the failed ones with attempts + 1, last_error and a backed-off next attempt
 * (dead-lettered after max_attempts), commit. In qx_relay_run the marking and COMMIT of one
 * batch run on a thread of the relay's while the next batch is claimed on the other connection
 * and published. Batches of many keys go through a second NATS connection of the relay's own
 * that gathers writes (send_asap off); the given connection sends everything else at once.
 *
 * Order: rows of one partition key reach the stream in seq order. Only one row per key is
 * unacked at a time, and a row that fails (or waits for its next attempt, or is locked
 * elsewhere) holds back the later rows of its key until it is published or dead-lettered.
 *
 * Shards: a row belongs to shard hash(partition_key, or the id without one) mod shard_count.
 * A session advisory lock per shard makes one relay the leader of a shard; the others wait
 * and retry the lock every lock_retry_ms, so a standby takes over when the leader's session
 * ends. */
typedef struct qx_relay qx_relay;

typedef struct qx_relay_options {
    const char *conninfo;      /* PostgreSQL url or conninfo */
    int connect_timeout_ms;    /* PostgreSQL connect timeout (default 10000) */
    qx_nats *nats;             /* retained by the relay */
    const char *subject_prefix;/* subject = prefix "." event_name (default "qx.events") */
    const char *channel;       /* LISTEN channel (default "qx_outbox", what the uow NOTIFYs) */
    int batch_size;            /* rows claimed per batch (default 1000) */
    int max_in_flight;         /* unacked messages at a time (default 1000) */
    int ack_timeout_ms;        /* a message not acked by then failed (default 5000) */
    int max_attempts;          /* dead-letter after this many failures; 0 = never (default 10) */
    int base_delay_ms;         /* backoff: base * 2^attempts ... (default 500) */
    int max_delay_ms;          /* ... at most this (default 60000) */
    int poll_interval_ms;      /* after work, look again after at most this (500) */
    int idle_interval_ms;      /* when idle (2000); a NOTIFY cuts both short */
    int shard_id, shard_count; /* 0 <= shard_id < shard_count (default 0 of 1) */
    int lock_retry_ms;         /* a standby retries the shard lock this often (default 1000) */
    int statement_timeout_ms;  /* for the relay's statements (default 30000) */
    int delete_published;      /* 1: delete acked rows instead of setting published_at (0) */
} qx_relay_options;

void qx_relay_options_init(qx_relay_options *o);
/* Checks the options and retains the NATS connection; connects to PostgreSQL on first use. */
qx_status qx_relay_new(qx_relay **out, const qx_relay_options *o, qx_error *err);
/* Closes its PostgreSQL connections (ending its leadership) and drops the NATS connection. */
void qx_relay_free(qx_relay *r);

/* One failed publish of a batch. */
typedef struct qx_relay_failure {
    char event_id[40];
    char error[256];
    int counted;       /* the message's own failure: counted toward max_attempts */
    int dead;          /* dead-lettered by this failure */
} qx_relay_failure;

#define QX_RELAY_FAILURES_MAX 16

typedef struct qx_relay_result {
    int leader;        /* 1 when this relay holds its shard's lock */
    int claimed;       /* rows the batch claimed */
    int published;     /* acked by JetStream (duplicates included) */
    int duplicates;    /* acked as duplicates: a previous attempt had reached the stream */
    int failed;        /* retried later after a backoff (retried included) */
    int retried;       /* of those, failed for the transport's reason (no connection, a
                        * timeout, no responders, no stream leader): attempts unchanged */
    int dead_lettered; /* dead-lettered: max_attempts reached, or a row that cannot be sent */
    int held;          /* claimed but held back behind an earlier failed row of their key */
    int database;      /* 1 when the relay's lock session is connected to PostgreSQL */
    int lock_lost;     /* 1 when the shard lock was found gone since the last report (its
                        * session ended): publishing stopped, nothing marked under it */
    int nfailures;     /* failures[0 .. nfailures): the batch's first failed publishes */
    qx_relay_failure failures[QX_RELAY_FAILURES_MAX];
} qx_relay_result;

/* One batch. Takes the shard lock first when it does not hold it (res->leader = 0 and nothing
 * done when another relay holds it). A database or NATS failure returns an error; the rows of
 * the batch are then untouched (rolled back) or marked failed. */
qx_status qx_relay_run_once(qx_relay *r, qx_relay_result *res, qx_error *err);

/* Called after each batch (err set when it failed) and while waiting for leadership; return
 * non-zero to stop. */
typedef int (*qx_relay_batch_fn)(void *ud, const qx_relay_result *res, const qx_error *err);

/* Runs batches until qx_relay_stop (or, with handle_signals, SIGTERM/SIGINT): the batch in
 * flight is finished first. Waits on LISTEN between batches; reconnects to PostgreSQL and
 * retries leadership by itself. Returns QX_OK when stopped. */
qx_status qx_relay_run(qx_relay *r, qx_relay_batch_fn fn, void *ud, int handle_signals,
                       qx_error *err);
/* Asks run to stop after the batch in flight. Safe from any thread and from a signal handler. */
void qx_relay_stop(qx_relay *r);

typedef struct qx_relay_stats {
    long long batches, claimed, published, duplicates, failed, retried, dead_lettered, held,
        errors;
    long long leader_changes;
    int leader;
    int running;
    double last_batch_at;  /* Unix time of the last batch, 0 before the first */
    double started_at;     /* Unix time qx_relay_new ran */
    qx_nats_state nats_state;
    long long nats_reconnects;
    char last_error[QX_ERR_MESSAGE_MAX]; /* "" when none since the last success */
} qx_relay_stats;
void qx_relay_stats_get(qx_relay *r, qx_relay_stats *s);


/* ---- metrics and health over HTTP ---------------------------------------------------------
 * A runner's /metrics and /health, served by a thread of its own (httpd.c). The listener is
 * bound by qx_httpd_new, so a bad address fails there: "HOST:PORT" or "[V6]:PORT", HOST an IP
 * address or localhost, PORT 0 for any free one. /metrics answers the last text handed over;
 * /health 200 "ok" while the last heartbeat is at most stale_ms old and said up, else 503 with
 * the reason. The setters copy and never wait for a request being answered. */
typedef struct qx_httpd qx_httpd;
qx_status qx_httpd_new(qx_httpd **out, const char *address, int stale_ms, qx_error *err);
void qx_httpd_free(qx_httpd *h);
int qx_httpd_port(const qx_httpd *h);
qx_status qx_httpd_set_metrics(qx_httpd *h, const char *text, size_t len, qx_error *err);
/* The loop ran now; up: its connections are up, else why (copied; NULL: no reason). */
void qx_httpd_beat(qx_httpd *h, int up, const char *why);

#ifdef __cplusplus
}
#endif
#endif
