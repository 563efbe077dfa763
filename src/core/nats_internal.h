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

/* A second connection to the same servers with the same options, except that nats.c gathers
 * its writes (send_asap off): for bulk publishing, where a write per message would cost more
 * than the millisecond a lone message may wait. A connection opened without send_asap is
 * simply retained. Release it with qx_nats_close. */
qx_status qx_nats_open_gathering(qx_nats *like, qx_nats **out, qx_error *err);

/* Unsubscribes and destroys a subscription once nats.c's reading thread can no longer be
 * handing it a message (a PING round trip); when that cannot be shown (not connected, no PONG
 * within 2 s) the subscription is kept until the connection closes. */
void qx_nats_drop_subscription(qx_nats *n, natsSubscription *sub);
/* The same for a JetStream context of asynchronous publishing with nothing pending (its ack
 * handler runs no more). When acks may still come (messages were taken back after a timeout)
 * it is kept until the connection closes: a late ack is a message for its subscription. */
void qx_nats_drop_context(qx_nats *n, jsCtx *js, int acks_may_come);

/* Fills err from a nats.c status (and the library's last error text for this thread, when it
 * says more); what names the operation. Returns the qx status: QX_ERR_TIMEOUT,
 * QX_ERR_CONNECTION, QX_ERR_NOT_FOUND, QX_ERR_NATS. */
qx_status qx_nats_error(qx_error *err, natsStatus s, jsErrCode jerr, const char *what);

#endif
