/* The metrics server userdata: core.metrics_server{...}, publish, beat, port, close. */
#include "binding.h"

#define QX_HTTPD_MT "qx.metrics_server"

typedef struct lhttpd {
    qx_httpd *h; /* NULL once closed */
} lhttpd;

static int l_publish(lua_State *L);
static int l_beat(lua_State *L);
static int l_port(lua_State *L);

static const luaL_Reg methods[] = {
    { "publish", l_publish },
    { "beat", l_beat },
    { "port", l_port },
    { NULL, NULL }
};

/* close, __gc and __close: the thread ends and the port is free again */
static void httpd_close(lua_State *L, void *ud)
{
    lhttpd *lh = ud;
    (void)L;
    qx_httpd_free(lh->h);
    lh->h = NULL;
}

static void httpd_describe(void *ud, char *buf, size_t size)
{
    snprintf(buf, size, "port %d", qx_httpd_port(((lhttpd *)ud)->h));
}

static const qx_type httpd_type = {
    QX_HTTPD_MT, methods, "close", httpd_close, httpd_describe, "closed", NULL
};

static lhttpd *check_httpd(lua_State *L)
{
    return qx_check_open(L, 1, &httpd_type, "metrics server is closed");
}

static const char *const httpd_options[] = { "listen", "stale_ms", NULL };

/* core.metrics_server{ listen = "HOST:PORT", stale_ms = 5000 } -> server | nil, err */
static int l_new(lua_State *L)
{
    static const char what[] = "core.metrics_server";
    const char *listen;
    int stale_ms;
    qx_error err;
    lhttpd *lh;

    qx_opt_check(L, 1, what, httpd_options);
    listen = qx_opt_string(L, 1, what, "listen", NULL, 1);
    stale_ms = (int)qx_opt_int(L, 1, what, "stale_ms", 1, 0x7fffffff, 5000);
    lh = qx_new_closed(L, &httpd_type, sizeof *lh);
    if (qx_httpd_new(&lh->h, listen, stale_ms, &err) != QX_OK)
        return qx_push_error(L, &err);
    return 1;
}

/* server:publish(text) -> true | nil, err: /metrics answers text from now on */
static int l_publish(lua_State *L)
{
    lhttpd *lh = check_httpd(L);
    size_t len;
    const char *text = luaL_checklstring(L, 2, &len);
    qx_error err;
    if (qx_httpd_set_metrics(lh->h, text, len, &err) != QX_OK)
        return qx_push_error(L, &err);
    lua_pushboolean(L, 1);
    return 1;
}

/* server:beat(up[, why]): the loop ran now; up: its connections are up, else why not */
static int l_beat(lua_State *L)
{
    lhttpd *lh = check_httpd(L);
    qx_httpd_beat(lh->h, lua_toboolean(L, 2), luaL_optstring(L, 3, NULL));
    return 0;
}

/* server:port() -> the port it listens on (the one chosen for port 0) */
static int l_port(lua_State *L)
{
    lua_pushinteger(L, qx_httpd_port(check_httpd(L)->h));
    return 1;
}

void qx_open_httpd(lua_State *L)
{
    qx_register_type(L, &httpd_type);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "metrics_server");
}
