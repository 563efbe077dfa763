/*
 * A small HTTP server for a runner's /metrics and /health, on a thread of its own.
 *
 * The runner's loop never waits for it: it hands over a copy of its Prometheus text
 * (qx_httpd_set_metrics) and a heartbeat (qx_httpd_beat), each a few stores under a mutex the
 * thread holds only to copy them. The thread answers from those, so a scrape gets an answer
 * while the loop is busy in a long batch, and /health can say that the loop has stopped
 * turning. One connection at a time, one request each (Connection: close), a second's timeout
 * on a slow client: enough for a scraper and a probe.
 */
#define _GNU_SOURCE /* accept4, pipe2 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <fcntl.h>

#include "qx.h"

#define REQUEST_MAX 8192
#define CLIENT_TIMEOUT_MS 1000
#define WHY_MAX 256

struct qx_httpd {
    int fd;           /* the listening socket */
    int wake[2];      /* written to by free: the thread ends */
    int port;
    int stale_ms;
    pthread_t thread;
    pthread_mutex_t mu;
    /* under mu: */
    char *metrics;    /* the last text handed over (NULL: none yet) */
    size_t metrics_len;
    double beat_at;   /* qx_clock() of the last heartbeat, 0 before the first */
    int up;
    char why[WHY_MAX];
};

/* "host:port" or "[v6 address]:port" -> host, port (in the caller's buffers) */
static qx_status split_address(const char *address, char *host, size_t hsize, char *port,
                               qx_error *err)
{
    const char *colon, *h = address;
    size_t hl;
    static const char usage[] = "expected HOST:PORT (an IP address or localhost, and a port "
                                "0-65535), e.g. 127.0.0.1:9464";

    if (address[0] == '[') {
        const char *close = strchr(address, ']');
        if (close == NULL || close[1] != ':')
            return qx_error_set(err, QX_ERR_INVALID, "metrics address \"%s\": %s", address, usage);
        h = address + 1;
        hl = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(address, ':');
        if (colon == NULL || memchr(address, ':', (size_t)(colon - address)) != NULL)
            return qx_error_set(err, QX_ERR_INVALID, "metrics address \"%s\": %s", address, usage);
        hl = (size_t)(colon - address);
    }
    if (hl == 0 || hl >= hsize || strlen(colon + 1) == 0 || strlen(colon + 1) > 5 ||
        strspn(colon + 1, "0123456789") != strlen(colon + 1) || atoi(colon + 1) > 65535)
        return qx_error_set(err, QX_ERR_INVALID, "metrics address \"%s\": %s", address, usage);
    memcpy(host, h, hl);
    host[hl] = '\0';
    strcpy(port, colon + 1);
    return QX_OK;
}

static qx_status open_listener(qx_httpd *h, const char *address, qx_error *err)
{
    char host[128], port[8];
    struct addrinfo hints, *ai = NULL;
    struct sockaddr_storage sa;
    socklen_t sl = sizeof sa;
    int rc, one = 1;

    if (split_address(address, host, sizeof host, port, err) != QX_OK)
        return err ? err->status : QX_ERR_INVALID;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    else
        hints.ai_flags |= AI_NUMERICHOST; /* no name lookups: an address of this machine */
    rc = getaddrinfo(host, port, &hints, &ai);
    if (rc != 0)
        return qx_error_set(err, QX_ERR_INVALID,
                            "metrics address \"%s\": %s is not an IP address (%s)", address, host,
                            gai_strerror(rc));
    h->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (h->fd < 0) {
        freeaddrinfo(ai);
        return qx_error_set(err, QX_ERR_INVALID, "cannot listen on %s: %s", address,
                            strerror(errno));
    }
    setsockopt(h->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ai->ai_family == AF_INET6)
        setsockopt(h->fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    rc = bind(h->fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(h->fd, 16) == 0 ? 0 : errno;
    freeaddrinfo(ai);
    if (rc != 0)
        return qx_error_set(err, QX_ERR_INVALID, "cannot listen on %s: %s%s", address,
                            strerror(rc),
                            rc == EADDRNOTAVAIL ? " (not an address of this machine)" : "");
    if (getsockname(h->fd, (struct sockaddr *)&sa, &sl) == 0)
        h->port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port
                                                 : ((struct sockaddr_in *)&sa)->sin_port);
    return QX_OK;
}

/* Sends all of len bytes (or gives up on a client that stops reading). */
static void send_all(int fd, const char *p, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

static void respond(int fd, int head_only, const char *status, const char *type,
                    const char *body, size_t len)
{
    char hdr[256];
    int n = snprintf(hdr, sizeof hdr,
                     "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                     status, type, len);
    send_all(fd, hdr, (size_t)n);
    if (!head_only)
        send_all(fd, body, len);
}

/* Reads the request head (up to the blank line, REQUEST_MAX bytes, CLIENT_TIMEOUT_MS). Returns
 * its length, or -1: nothing usable came. */
static int read_request(int fd, char *buf)
{
    size_t len = 0;
    double deadline = qx_clock() + CLIENT_TIMEOUT_MS / 1000.0;

    while (len < REQUEST_MAX - 1) {
        struct pollfd p;
        int left = (int)((deadline - qx_clock()) * 1000);
        ssize_t n;
        if (left <= 0)
            return -1;
        p.fd = fd;
        p.events = POLLIN;
        p.revents = 0;
        if (poll(&p, 1, left) <= 0)
            continue;
        n = recv(fd, buf + len, REQUEST_MAX - 1 - len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        len += (size_t)n;
        buf[len] = '\0';
        if (strstr(buf, "\r\n\r\n") != NULL || strstr(buf, "\n\n") != NULL)
            return (int)len;
    }
    return (int)len; /* a long head: the request line is what counts */
}

static void serve_health(qx_httpd *h, int fd, int head_only)
{
    char body[WHY_MAX + 96];
    double beat_at, age;
    int up, n;

    pthread_mutex_lock(&h->mu);
    beat_at = h->beat_at;
    up = h->up;
    snprintf(body, sizeof body, "%s", h->why);
    pthread_mutex_unlock(&h->mu);
    age = qx_clock() - beat_at;
    if (beat_at == 0) {
        n = snprintf(body, sizeof body, "starting: the loop has not run yet\n");
    } else if (age * 1000 > h->stale_ms) {
        n = snprintf(body, sizeof body, "stalled: the loop last ran %.1f s ago (limit %.1f s)\n",
                     age, h->stale_ms / 1000.0);
    } else if (!up) {
        char why[WHY_MAX];
        memcpy(why, body, sizeof why);
        why[WHY_MAX - 1] = '\0';
        n = snprintf(body, sizeof body, "down: %s\n", why[0] ? why : "a connection is down");
    } else {
        respond(fd, head_only, "200 OK", "text/plain; charset=utf-8", "ok\n", 3);
        return;
    }
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof body)
        n = (int)sizeof body - 1;
    respond(fd, head_only, "503 Service Unavailable", "text/plain; charset=utf-8", body,
            (size_t)n);
}

static void serve_metrics(qx_httpd *h, int fd, int head_only)
{
    char *copy = NULL;
    size_t len = 0;

    pthread_mutex_lock(&h->mu);
    if (h->metrics != NULL && (copy = malloc(h->metrics_len + 1)) != NULL) {
        memcpy(copy, h->metrics, h->metrics_len);
        len = h->metrics_len;
    }
    pthread_mutex_unlock(&h->mu);
    respond(fd, head_only, "200 OK", "text/plain; version=0.0.4; charset=utf-8",
            copy ? copy : "", len);
    free(copy);
}

static void serve(qx_httpd *h, int fd)
{
    char req[REQUEST_MAX];
    char method[8], path[64];
    int head_only;
    struct timeval tv = { CLIENT_TIMEOUT_MS / 1000, (CLIENT_TIMEOUT_MS % 1000) * 1000 };

    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (read_request(fd, req) < 0)
        return;
    if (sscanf(req, "%7s %63s HTTP/", method, path) != 2) {
        respond(fd, 0, "400 Bad Request", "text/plain", "bad request\n", 12);
        return;
    }
    head_only = strcmp(method, "HEAD") == 0;
    if (!head_only && strcmp(method, "GET") != 0) {
        respond(fd, 0, "405 Method Not Allowed", "text/plain", "GET or HEAD\n", 12);
        return;
    }
    path[strcspn(path, "?")] = '\0';
    if (strcmp(path, "/metrics") == 0)
        serve_metrics(h, fd, head_only);
    else if (strcmp(path, "/health") == 0)
        serve_health(h, fd, head_only);
    else
        respond(fd, head_only, "404 Not Found", "text/plain", "/metrics or /health\n", 20);
}

static void *serve_thread(void *p)
{
    qx_httpd *h = p;
    for (;;) {
        struct pollfd fds[2];
        int c;
        fds[0].fd = h->wake[0];
        fds[0].events = POLLIN;
        fds[0].revents = 0;
        fds[1].fd = h->fd;
        fds[1].events = POLLIN;
        fds[1].revents = 0;
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents != 0)
            break;
        if (!(fds[1].revents & POLLIN))
            continue;
        c = accept4(h->fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        serve(h, c);
        close(c);
    }
    return NULL;
}

qx_status qx_httpd_new(qx_httpd **out, const char *address, int stale_ms, qx_error *err)
{
    qx_httpd *h;
    qx_status s;

    *out = NULL;
    qx_error_clear(err);
    if (address == NULL)
        return qx_error_set(err, QX_ERR_INVALID, "metrics address: expected HOST:PORT");
    if (stale_ms < 1)
        return qx_error_set(err, QX_ERR_INVALID, "health stale limit must be at least 1 ms");
    h = calloc(1, sizeof *h);
    if (h == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    h->fd = h->wake[0] = h->wake[1] = -1;
    h->stale_ms = stale_ms;
    pthread_mutex_init(&h->mu, NULL);
    s = open_listener(h, address, err);
    if (s == QX_OK && pipe2(h->wake, O_CLOEXEC) != 0)
        s = qx_error_set(err, QX_ERR_NOMEM, "cannot make a pipe: %s", strerror(errno));
    if (s == QX_OK && pthread_create(&h->thread, NULL, serve_thread, h) != 0)
        s = qx_error_set(err, QX_ERR_NOMEM, "cannot start the metrics thread");
    if (s != QX_OK) {
        if (h->fd >= 0)
            close(h->fd);
        if (h->wake[0] >= 0) {
            close(h->wake[0]);
            close(h->wake[1]);
        }
        pthread_mutex_destroy(&h->mu);
        free(h);
        return s;
    }
    *out = h;
    return QX_OK;
}

void qx_httpd_free(qx_httpd *h)
{
    char c = 1;
    ssize_t w;
    if (h == NULL)
        return;
    w = write(h->wake[1], &c, 1);
    (void)w;
    pthread_join(h->thread, NULL);
    close(h->fd);
    close(h->wake[0]);
    close(h->wake[1]);
    pthread_mutex_destroy(&h->mu);
    free(h->metrics);
    free(h);
}

int qx_httpd_port(const qx_httpd *h)
{
    return h->port;
}

qx_status qx_httpd_set_metrics(qx_httpd *h, const char *text, size_t len, qx_error *err)
{
    char *copy = malloc(len + 1), *old;
    if (copy == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    memcpy(copy, text, len);
    copy[len] = '\0';
    pthread_mutex_lock(&h->mu);
    old = h->metrics;
    h->metrics = copy;
    h->metrics_len = len;
    pthread_mutex_unlock(&h->mu);
    free(old);
    return QX_OK;
}

void qx_httpd_beat(qx_httpd *h, int up, const char *why)
{
    double now = qx_clock();
    pthread_mutex_lock(&h->mu);
    h->beat_at = now;
    h->up = up;
    snprintf(h->why, sizeof h->why, "%s", up || why == NULL ? "" : why);
    pthread_mutex_unlock(&h->mu);
}
