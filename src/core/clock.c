/* Wall and monotonic clocks. */
#include <stdio.h>
#include <time.h>

#include "qx.h"

void qx_now_iso8601(char buf[QX_ISO8601_STRLEN + 1])
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(buf, QX_ISO8601_STRLEN + 1, "%Y-%m-%dT%H:%M:%S", &tm); /* 19 characters */
    snprintf(buf + 19, QX_ISO8601_STRLEN + 1 - 19, ".%06uZ",
             (unsigned)(ts.tv_nsec / 1000) % 1000000u);
}

double qx_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}
