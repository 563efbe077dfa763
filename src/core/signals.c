/* SIGTERM/SIGINT for a command that waits outside the relay's loop (`qx relay` before NATS is
 * reached) and for the projection and consumer runners (run with handle_signals): while
 * watched, a signal sets a flag instead of ending the process, and a sleep returns early, so
 * the command can stop as cleanly as the loop does. The relay's loop installs its own handlers
 * for its run and restores these afterwards. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>

#include "qx.h"

static volatile sig_atomic_t caught;
static int watching;
static struct sigaction old_term, old_int;

static void on_signal(int sig)
{
    (void)sig;
    caught = 1;
}

void qx_signals_watch(int on)
{
    if (on && !watching) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask); /* no SA_RESTART: a sleep is cut short */
        caught = 0;
        sigaction(SIGTERM, &sa, &old_term);
        sigaction(SIGINT, &sa, &old_int);
        watching = 1;
    } else if (!on && watching) {
        sigaction(SIGTERM, &old_term, NULL);
        sigaction(SIGINT, &old_int, NULL);
        watching = 0;
    }
}

int qx_signals_caught(void)
{
    return caught != 0;
}

int qx_signals_sleep(int timeout_ms)
{
    double until = qx_clock() + (timeout_ms > 0 ? timeout_ms : 0) / 1000.0;
    while (!caught) {
        double left = until - qx_clock();
        if (left <= 0)
            break;
        /* in slices: a signal landing between the check and the sleep waits one slice at most */
        if (left > 0.1)
            left = 0.1;
        struct timespec ts = { 0, (long)(left * 1e9) };
        if (nanosleep(&ts, NULL) != 0 && errno != EINTR)
            break;
    }
    return caught != 0;
}
