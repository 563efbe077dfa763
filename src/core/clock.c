/* Wall and monotonic clocks. */
#include <time.h>

#include "qx.h"

/* Writes v as exactly `width` decimal digits ending at p[width - 1]. */
static void digits(char *p, unsigned v, int width)
{
    while (width-- > 0) {
        p[width] = (char)('0' + v % 10);
        v /= 10;
    }
}

/* Every event is stamped with this, so the digits are written by hand: strftime and snprintf
 * cost ten times as much (locale and format parsing) for a fixed layout. */
static void format_utc(char buf[QX_ISO8601_STRLEN + 1], time_t secs, unsigned usec)
{
    struct tm tm;
    if (gmtime_r(&secs, &tm) == NULL || tm.tm_year + 1900 > 9999 || tm.tm_year + 1900 < 0) {
        secs = 0; /* beyond what the layout holds: the epoch */
        usec = 0;
        gmtime_r(&secs, &tm);
    }
    /* YYYY-MM-DDTHH:MM:SS.uuuuuuZ */
    digits(buf, (unsigned)(tm.tm_year + 1900) % 10000u, 4);
    buf[4] = '-';
    digits(buf + 5, (unsigned)tm.tm_mon + 1, 2);
    buf[7] = '-';
    digits(buf + 8, (unsigned)tm.tm_mday, 2);
    buf[10] = 'T';
    digits(buf + 11, (unsigned)tm.tm_hour, 2);
    buf[13] = ':';
    digits(buf + 14, (unsigned)tm.tm_min, 2);
    buf[16] = ':';
    digits(buf + 17, (unsigned)tm.tm_sec, 2);
    buf[19] = '.';
    digits(buf + 20, usec % 1000000u, 6);
    buf[26] = 'Z';
    buf[27] = '\0';
}

void qx_now_iso8601(char buf[QX_ISO8601_STRLEN + 1])
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    format_utc(buf, ts.tv_sec, (unsigned)(ts.tv_nsec / 1000));
}

void qx_iso8601_from_ns(char buf[QX_ISO8601_STRLEN + 1], int64_t ns)
{
    if (ns < 0)
        ns = 0;
    format_utc(buf, (time_t)(ns / 1000000000), (unsigned)((ns % 1000000000) / 1000));
}

double qx_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}
