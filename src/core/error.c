/* Error codes and the SQLSTATE mapping shared by every part of the core. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "qx.h"

const char *qx_status_name(qx_status s)
{
    switch (s) {
    case QX_OK: return "ok";
    case QX_ERR_CONFLICT: return "conflict";
    case QX_ERR_NOT_FOUND: return "not_found";
    case QX_ERR_INVALID: return "invalid";
    case QX_ERR_DB: return "db";
    case QX_ERR_CONNECTION: return "connection";
    case QX_ERR_TIMEOUT: return "timeout";
    case QX_ERR_NATS: return "nats";
    case QX_ERR_NOMEM: return "nomem";
    case QX_ERR_CLOSED: return "closed";
    case QX_ERR_UNKNOWN_OUTCOME: return "unknown_outcome";
    case QX_PENDING: return "pending";
    }
    return "error";
}

qx_status qx_error_set(qx_error *err, qx_status s, const char *fmt, ...)
{
    if (err != NULL) {
        va_list ap;
        err->status = s;
        err->retryable = 0;
        err->sqlstate[0] = '\0';
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return s;
}

void qx_error_clear(qx_error *err)
{
    if (err != NULL) {
        err->status = QX_OK;
        err->retryable = 0;
        err->sqlstate[0] = '\0';
        err->message[0] = '\0';
    }
}

qx_status qx_status_from_sqlstate(const char *st, int *retryable)
{
    if (retryable != NULL)
        *retryable = 0;
    if (st == NULL || strlen(st) != 5)
        return QX_ERR_DB;
    if (strcmp(st, "40001") == 0 || strcmp(st, "40P01") == 0) {
        if (retryable != NULL)
            *retryable = 1;
        return QX_ERR_CONFLICT;
    }
    if (strcmp(st, "23505") == 0 || strcmp(st, "23P01") == 0) /* unique, exclusion */
        return QX_ERR_CONFLICT;
    /* qx's own codes, raised by SQL that qx writes (e.g. a version check that must hold inside
     * a pipelined batch, so that COMMIT in the same batch is skipped when it does not) */
    if (strcmp(st, "QX409") == 0)
        return QX_ERR_CONFLICT;
    if (strcmp(st, "QX404") == 0)
        return QX_ERR_NOT_FOUND;
    if (strcmp(st, "QX422") == 0)
        return QX_ERR_INVALID;
    if (strcmp(st, "57014") == 0 || strcmp(st, "55P03") == 0 || strcmp(st, "25P03") == 0)
        return QX_ERR_TIMEOUT; /* canceled (statement_timeout), lock timeout, idle-in-tx timeout */
    if (strcmp(st, "08P01") == 0)
        return QX_ERR_INVALID; /* protocol violation: e.g. the wrong number of parameters */
    if (strncmp(st, "08", 2) == 0 || strcmp(st, "57P01") == 0 || strcmp(st, "57P02") == 0 ||
        strcmp(st, "57P03") == 0)
        return QX_ERR_CONNECTION; /* connection exception, admin/crash shutdown, cannot connect */
    if (strncmp(st, "22", 2) == 0 || strncmp(st, "23", 2) == 0)
        return QX_ERR_INVALID; /* data exception, other integrity constraint violations */
    return QX_ERR_DB;
}

qx_status qx_error_server(qx_error *err, const char *sqlstate, const char *primary,
                          const char *detail)
{
    int retryable = 0;
    qx_status s = sqlstate != NULL ? qx_status_from_sqlstate(sqlstate, &retryable) : QX_ERR_DB;
    size_t n;
    if (err == NULL)
        return s;
    if (primary != NULL && detail != NULL)
        qx_error_set(err, s, "%s (%s)", primary, detail);
    else
        qx_error_set(err, s, "%s", primary != NULL ? primary : "unknown server error");
    n = strlen(err->message);
    while (n > 0 && (err->message[n - 1] == '\n' || err->message[n - 1] == ' '))
        err->message[--n] = '\0';
    err->retryable = retryable;
    if (sqlstate != NULL)
        snprintf(err->sqlstate, sizeof err->sqlstate, "%s", sqlstate);
    return s;
}
