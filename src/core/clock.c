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
void qx_now_iso8601(char buf[QX_ISO8601_STRLEN + 1])
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
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
    digits(buf + 20, (unsigned)(ts.tv_nsec / 1000) % 1000000u, 6);
    buf[26] = 'Z';
    buf[27] = '\0';
}

double qx_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}
