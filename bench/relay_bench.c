/*
 * The raw nats.c side of the relay benchmark (bench/relay_bench.lua compiles and runs it).
 *
 *   relay_bench publish URL SUBJECT BODY_FILE COUNT WINDOW
 *       js_PublishAsync of COUNT messages like the relay's (the same body, the qx headers and a
 *       unique Nats-Msg-Id each) with at most WINDOW unacked; prints "published N in S s".
 *   relay_bench listen URL SUBJECT COUNT SECONDS
 *       a core NATS subscription; prints each message's "i" (from its body) and the
 *       CLOCK_MONOTONIC time it arrived, for the first COUNT messages or SECONDS.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nats/nats.h>

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, natsStatus s)
{
    fprintf(stderr, "relay_bench: %s: %s\n", what, natsStatus_GetText(s));
    exit(1);
}

static char *slurp(const char *path, int *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0) {
        perror(path);
        exit(1);
    }
    rewind(f);
    buf = malloc((size_t)n + 1);
    if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        perror(path);
        exit(1);
    }
    fclose(f);
    buf[n] = '\0';
    *len = (int)n;
    return buf;
}

static int publish(const char *url, const char *subject, const char *body_file, int count,
                   int window)
{
    natsConnection *nc = NULL;
    jsCtx *js = NULL;
    jsOptions jo;
    natsStatus s;
    int len, i;
    char *body = slurp(body_file, &len);
    char run[32], id[96];
    double t0, t1;

    snprintf(run, sizeof run, "%08lx%04x", (unsigned long)time(NULL), (unsigned)(mono() * 1e6) & 0xffff);
    if ((s = natsConnection_ConnectTo(&nc, url)) != NATS_OK)
        die("connect", s);
    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = window;
    jo.PublishAsync.StallWait = 30000; /* a busy server must slow us down, not fail us */
    if ((s = natsConnection_JetStream(&js, nc, &jo)) != NATS_OK)
        die("jetstream", s);
    t0 = mono();
    for (i = 0; i < count; i++) {
        natsMsg *m = NULL;
        jsPubOptions po;
        /* a fresh id per message and run: the duplicate window must not swallow any */
        snprintf(id, sizeof id, "%s-%08d-0000-7000-8000-000000000000", run, i);
        s = natsMsg_Create(&m, subject, NULL, body, len);
        if (s == NATS_OK)
            s = natsMsgHeader_Set(m, "qx.event_name", "bench.thing_happened");
        if (s == NATS_OK)
            s = natsMsgHeader_Set(m, "qx.event_version", "1");
        if (s == NATS_OK)
            s = natsMsgHeader_Set(m, "qx.event_id", id);
        if (s == NATS_OK)
            s = natsMsgHeader_Set(m, "qx.correlation_id", id);
        jsPubOptions_Init(&po);
        po.MsgId = id;
        if (s == NATS_OK)
            s = js_PublishMsgAsync(js, &m, &po);
        natsMsg_Destroy(m);
        if (s != NATS_OK)
            die("publish", s);
    }
    {
        jsPubOptions po;
        jsPubOptions_Init(&po);
        po.MaxWait = 60000;
        if ((s = js_PublishAsyncComplete(js, &po)) != NATS_OK)
            die("complete", s);
    }
    t1 = mono();
    printf("published %d in %.3f s\n", count, t1 - t0);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    free(body);
    return 0;
}

/* Prints "<i> <CLOCK_MONOTONIC seconds>" as each message arrives (its body's "i"), then a
 * summary line; bench/relay_bench.lua pairs them with the commit times. */
static int listen(const char *url, const char *subject, int count, int seconds)
{
    natsConnection *nc = NULL;
    natsSubscription *sub = NULL;
    natsStatus s;
    double deadline = mono() + seconds;
    int n = 0;

    if ((s = natsConnection_ConnectTo(&nc, url)) != NATS_OK)
        die("connect", s);
    if ((s = natsConnection_SubscribeSync(&sub, nc, subject)) != NATS_OK)
        die("subscribe", s);
    if ((s = natsConnection_Flush(nc)) != NATS_OK)
        die("flush", s);
    printf("listening\n");
    fflush(stdout);
    while (n < count && mono() < deadline) {
        natsMsg *m = NULL;
        const char *p;
        double now;
        s = natsSubscription_NextMsg(&m, sub, 200);
        now = mono();
        if (s == NATS_TIMEOUT)
            continue;
        if (s != NATS_OK)
            die("next", s);
        p = strstr(natsMsg_GetData(m), "\"i\":");
        if (p != NULL) {
            printf("%ld %.6f\n", strtol(p + 4, NULL, 10), now);
            n++;
        }
        natsMsg_Destroy(m);
    }
    printf("received %d\n", n);
    fflush(stdout);
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(nc);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 7 && strcmp(argv[1], "publish") == 0)
        return publish(argv[2], argv[3], argv[4], atoi(argv[5]), atoi(argv[6]));
    if (argc == 6 && strcmp(argv[1], "listen") == 0)
        return listen(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: relay_bench publish URL SUBJECT BODY_FILE COUNT WINDOW\n"
                    "       relay_bench listen URL SUBJECT COUNT SECONDS\n");
    return 2;
}
