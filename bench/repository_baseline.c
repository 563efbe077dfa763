/*
 * The raw libpq baseline of bench/repository_bench.lua: replays, for a few seconds each, the
 * exact statements qx's repository sent for one operation - same SQL text, same parameters,
 * grouped into the same pipelined round trips, each distinct text prepared once - and prints
 * "name ops_per_second cpu_microseconds_per_op" per operation.
 *
 *   repository_baseline CONNINFO SPECFILE SECONDS
 *
 * SPECFILE (written by the Lua driver), per operation:
 *   op NAME BATCHES VBATCH VSTMT VPARAM   (1-based: the batch, statement and parameter that
 *   batch NSTMTS                            hold the row's version, which goes up by one per
 *   stmt NPARAMS                            operation as a save does; 0 0 0 when none)
 *   <len>\n<sql bytes>\n
 *   <len>\n<param bytes>\n  (len -1: NULL)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#define MAX_STMTS 16
#define MAX_BATCHES 8
#define MAX_PARAMS 64

typedef struct stmt {
    char *sql;
    int nparams;
    char *values[MAX_PARAMS];
    char name[32];
} stmt;

typedef struct op {
    char name[64];
    int nbatches;
    int nstmts[MAX_BATCHES];
    stmt stmts[MAX_BATCHES][MAX_STMTS];
    int version_batch, version_stmt, version_param; /* 1-based; 0 = none */
} op;

static void die(const char *msg, PGconn *c)
{
    fprintf(stderr, "baseline: %s%s%s\n", msg, c ? ": " : "", c ? PQerrorMessage(c) : "");
    exit(1);
}

static char *read_blob(FILE *f)
{
    long len;
    char *s;
    if (fscanf(f, "%ld", &len) != 1)
        die("bad spec file (length)", NULL);
    fgetc(f); /* newline */
    if (len < 0)
        return NULL;
    s = malloc((size_t)len + 1);
    if (!s || fread(s, 1, (size_t)len, f) != (size_t)len)
        die("bad spec file (bytes)", NULL);
    s[len] = '\0';
    fgetc(f);
    return s;
}

static int read_op(FILE *f, op *o)
{
    int b, i, k;
    if (fscanf(f, " op %63s %d %d %d %d", o->name, &o->nbatches, &o->version_batch,
               &o->version_stmt, &o->version_param) != 5)
        return 0;
    if (o->nbatches > MAX_BATCHES)
        die("bad spec file (too many batches)", NULL);
    for (b = 0; b < o->nbatches; b++) {
        if (fscanf(f, " batch %d", &o->nstmts[b]) != 1 || o->nstmts[b] > MAX_STMTS)
            die("bad spec file (batch)", NULL);
        for (i = 0; i < o->nstmts[b]; i++) {
            stmt *s = &o->stmts[b][i];
            if (fscanf(f, " stmt %d", &s->nparams) != 1 || s->nparams > MAX_PARAMS)
                die("bad spec file (stmt)", NULL);
            fgetc(f);
            s->sql = read_blob(f);
            for (k = 0; k < s->nparams; k++)
                s->values[k] = read_blob(f);
        }
    }
    return 1;
}

static void free_op(op *o)
{
    int b, i, k;
    for (b = 0; b < o->nbatches; b++)
        for (i = 0; i < o->nstmts[b]; i++) {
            free(o->stmts[b][i].sql);
            for (k = 0; k < o->stmts[b][i].nparams; k++)
                free(o->stmts[b][i].values[k]);
        }
    memset(o, 0, sizeof *o);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Prepares every statement of the op once, as qx's statement cache does. */
static void prepare(PGconn *c, op *o, int *next_id)
{
    int b, i;
    for (b = 0; b < o->nbatches; b++)
        for (i = 0; i < o->nstmts[b]; i++) {
            stmt *s = &o->stmts[b][i];
            PGresult *r;
            snprintf(s->name, sizeof s->name, "b_%d", (*next_id)++);
            r = PQprepare(c, s->name, s->sql, 0, NULL);
            if (PQresultStatus(r) != PGRES_COMMAND_OK)
                die("prepare failed", c);
            PQclear(r);
        }
}

/* One round trip: every statement of the batch in pipeline mode, one Sync. */
static void run_batch(PGconn *c, op *o, int b)
{
    int i;
    PGresult *r;
    if (!PQenterPipelineMode(c))
        die("pipeline mode", c);
    for (i = 0; i < o->nstmts[b]; i++) {
        stmt *s = &o->stmts[b][i];
        if (!PQsendQueryPrepared(c, s->name, s->nparams, (const char *const *)s->values, NULL,
                                 NULL, 0))
            die("send failed", c);
    }
    if (!PQpipelineSync(c))
        die("sync failed", c);
    for (i = 0; i < o->nstmts[b]; i++) {
        while ((r = PQgetResult(c)) != NULL) {
            ExecStatusType st = PQresultStatus(r);
            if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
                die(o->name, c);
            PQclear(r);
        }
    }
    r = PQgetResult(c);
    if (PQresultStatus(r) != PGRES_PIPELINE_SYNC)
        die("expected the end of the pipeline", c);
    PQclear(r);
    if (!PQexitPipelineMode(c))
        die("exit pipeline mode", c);
}

int main(int argc, char **argv)
{
    PGconn *c;
    FILE *f;
    double seconds;
    int next_id = 0;
    op *o = calloc(1, sizeof *o);

    if (argc != 4) {
        fprintf(stderr, "usage: %s CONNINFO SPECFILE SECONDS\n", argv[0]);
        return 2;
    }
    seconds = atof(argv[3]);
    c = PQconnectdb(argv[1]);
    if (PQstatus(c) != CONNECTION_OK)
        die("connect failed", c);
    f = fopen(argv[2], "rb");
    if (!f)
        die("cannot open the spec file", NULL);
    while (o && read_op(f, o)) {
        long n = 0;
        double t0, t;
        clock_t c0;
        char vbuf[32];
        long version = 0;
        stmt *vs = NULL;
        prepare(c, o, &next_id);
        if (o->version_param > 0) {
            vs = &o->stmts[o->version_batch - 1][o->version_stmt - 1];
            version = atol(vs->values[o->version_param - 1]);
            snprintf(vbuf, sizeof vbuf, "%ld", version);
        }
        c0 = clock();
        t0 = now();
        do {
            int b;
            if (vs) {
                char *keep = vs->values[o->version_param - 1];
                snprintf(vbuf, sizeof vbuf, "%ld", version++);
                vs->values[o->version_param - 1] = vbuf;
                for (b = 0; b < o->nbatches; b++)
                    run_batch(c, o, b);
                vs->values[o->version_param - 1] = keep;
            } else {
                for (b = 0; b < o->nbatches; b++)
                    run_batch(c, o, b);
            }
            n++;
            t = now();
        } while (t - t0 < seconds);
        printf("%s %.1f %.1f\n", o->name, (double)n / (t - t0),
               (double)(clock() - c0) / CLOCKS_PER_SEC / (double)n * 1e6);
        fflush(stdout);
        free_op(o);
    }
    fclose(f);
    PQfinish(c);
    free(o);
    return 0;
}
