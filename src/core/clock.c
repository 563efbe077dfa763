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

/* n decimal digits at *p into *out; advances p */
static int take_digits(const char **p, int n, int *out)
{
    int v = 0;
    while (n-- > 0) {
        if (**p < '0' || **p > '9')
            return 0;
        v = v * 10 + (*(*p)++ - '0');
    }
    *out = v;
    return 1;
}

qx_status qx_iso8601_parse(int64_t *ns, const char *s, qx_error *err)
{
    const char *p = s;
    struct tm tm = { 0 };
    int y, mo, d, h, mi, sec, frac = 0, digits_seen = 0, off = 0;
    time_t t;

    *ns = 0;
    if (!take_digits(&p, 4, &y) || *p++ != '-' || !take_digits(&p, 2, &mo) || *p++ != '-' ||
        !take_digits(&p, 2, &d) || (*p != 'T' && *p != 't' && *p != ' ') || !*p++ ||
        !take_digits(&p, 2, &h) || *p++ != ':' || !take_digits(&p, 2, &mi) || *p++ != ':' ||
        !take_digits(&p, 2, &sec))
        goto bad;
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9') {
            if (digits_seen < 9) {
                frac = frac * 10 + (*p - '0');
                digits_seen++;
            }
            p++;
        }
        if (digits_seen == 0)
            goto bad;
        while (digits_seen++ < 9)
            frac *= 10;
    }
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p++ == '-' ? -1 : 1, oh, om;
        if (!take_digits(&p, 2, &oh) || *p++ != ':' || !take_digits(&p, 2, &om) || oh > 23 ||
            om > 59)
            goto bad;
        off = sign * (oh * 3600 + om * 60);
    } else {
        goto bad; /* a time without its zone would be read in some zone nobody chose */
    }
    if (*p != '\0' || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60)
        goto bad;
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    t = timegm(&tm);
    if (t == (time_t)-1 || tm.tm_mday != d)
        goto bad;
    *ns = ((int64_t)t - off) * 1000000000 + frac;
    return QX_OK;
bad:
    return qx_error_set(err, QX_ERR_INVALID,
                        "'%s' is not an ISO-8601 time with a zone (2026-12-07T10:00:00Z)", s);
}

double qx_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double qx_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}
