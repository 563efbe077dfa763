/* For core files that talk to NATS themselves (the relay, the consumer): the nats.c handles
 * behind a qx_nats. Not part of the public header, which stays free of nats.c types. */
#ifndef QX_NATS_INTERNAL_H
#define QX_NATS_INTERNAL_H

#include <nats/nats.h>

#include "qx.h"

natsConnection *qx_nats_conn(qx_nats *n);
/* The shared JetStream context (synchronous calls). A relay publishing asynchronously makes its
 * own context on qx_nats_conn(n), since ack handlers are per context. */
jsCtx *qx_nats_js(qx_nats *n);

/* Fills err from a nats.c status (and the library's last error text for this thread, when it
 * says more); what names the operation. Returns the qx status: QX_ERR_TIMEOUT,
 * QX_ERR_CONNECTION, QX_ERR_NOT_FOUND, QX_ERR_NATS. */
qx_status qx_nats_error(qx_error *err, natsStatus s, jsErrCode jerr, const char *what);

#endif
