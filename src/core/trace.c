/* W3C Trace Context syntax (https://www.w3.org/TR/trace-context/): traceparent and tracestate.
 * Every unit of work with a trace context checks it, so the checks are one pass in C: Lua's
 * pattern matcher took ~40,000 instructions for a typical pair, a tenth of the unit of work. */
#include <string.h>

#include "qx.h"

#define TRACESTATE_MAX_MEMBERS 32

static int lower_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* s[from, from + len) lowercase hex, and whether it is all zeros */
static int hex_run(const char *s, size_t from, size_t len, int *all_zero)
{
    size_t i;
    *all_zero = 1;
    for (i = from; i < from + len; i++) {
        if (!lower_hex((unsigned char)s[i]))
            return 0;
        if (s[i] != '0')
            *all_zero = 0;
    }
    return 1;
}

int qx_traceparent_check(const char *s, size_t n, const char **why)
{
    int zero_trace, zero_parent, zero;
    if (n < 55 || s[2] != '-' || s[35] != '-' || s[52] != '-') {
        *why = "not version-traceid-parentid-flags of 2, 32, 16 and 2 hex digits";
        return 0;
    }
    if (!hex_run(s, 0, 2, &zero) || !hex_run(s, 3, 32, &zero_trace) ||
        !hex_run(s, 36, 16, &zero_parent) || !hex_run(s, 53, 2, &zero)) {
        *why = "not lowercase hex";
        return 0;
    }
    if (s[0] == 'f' && s[1] == 'f') {
        *why = "version ff is invalid";
        return 0;
    }
    if (n > 55 && s[0] == '0' && s[1] == '0') {
        *why = "version 00 is exactly 55 characters";
        return 0;
    }
    if (n > 55 && s[55] != '-') { /* a later version: more only after a dash */
        *why = "the flags are not followed by the end or a '-'";
        return 0;
    }
    if (zero_trace) {
        *why = "the trace id is all zeros";
        return 0;
    }
    if (zero_parent) {
        *why = "the parent id is all zeros";
        return 0;
    }
    return 1;
}

static int lcalpha(unsigned char c)
{
    return c >= 'a' && c <= 'z';
}

static int key_char(unsigned char c)
{
    return lcalpha(c) || (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '*' || c == '/';
}

/* simple-key: lcalpha 0*255(keychar); multi-tenant-key: (lcalpha / DIGIT) 0*240(keychar) "@"
 * lcalpha 0*13(keychar) */
static int key_valid(const char *k, size_t n)
{
    const char *at = memchr(k, '@', n);
    size_t i, tenant, system;
    if (at == NULL) {
        if (n < 1 || n > 256 || !lcalpha((unsigned char)k[0]))
            return 0;
        for (i = 1; i < n; i++)
            if (!key_char((unsigned char)k[i]))
                return 0;
        return 1;
    }
    tenant = (size_t)(at - k);
    system = n - tenant - 1;
    if (tenant < 1 || tenant > 241 || system < 1 || system > 14)
        return 0;
    if (!lcalpha((unsigned char)k[0]) && !(k[0] >= '0' && k[0] <= '9'))
        return 0;
    for (i = 1; i < tenant; i++)
        if (!key_char((unsigned char)k[i]))
            return 0;
    if (!lcalpha((unsigned char)at[1]))
        return 0;
    for (i = 2; i <= system; i++)
        if (!key_char((unsigned char)at[i]))
            return 0;
    return 1;
}

/* 0*255(chr) nblk-chr; chr = %x20 / nblk-chr; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E */
static int value_valid(const char *v, size_t n)
{
    size_t i;
    if (n < 1 || n > 256 || v[n - 1] == ' ')
        return 0;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c < 0x20 || c > 0x7e || c == ',' || c == '=')
            return 0;
    }
    return 1;
}

int qx_tracestate_check(const char *s, size_t n, const char **why)
{
    const char *keys[TRACESTATE_MAX_MEMBERS];
    size_t key_len[TRACESTATE_MAX_MEMBERS];
    size_t pos = 0;
    int count = 0, j;

    while (pos <= n) {
        const char *end = memchr(s + pos, ',', n - pos);
        size_t stop = end != NULL ? (size_t)(end - s) : n;
        size_t a = pos, b = stop;
        const char *eq;
        /* OWS around a member; an empty member is allowed */
        while (a < b && (s[a] == ' ' || s[a] == '\t'))
            a++;
        while (b > a && (s[b - 1] == ' ' || s[b - 1] == '\t'))
            b--;
        if (a < b) {
            if (count == TRACESTATE_MAX_MEMBERS) {
                *why = "more than 32 list members";
                return 0;
            }
            eq = memchr(s + a, '=', b - a);
            if (eq == NULL) {
                *why = "a list member is not key=value";
                return 0;
            }
            if (!key_valid(s + a, (size_t)(eq - (s + a)))) {
                *why = "a list member has an invalid key";
                return 0;
            }
            if (!value_valid(eq + 1, (size_t)(s + b - (eq + 1)))) {
                *why = "a list member has an invalid value";
                return 0;
            }
            keys[count] = s + a;
            key_len[count] = (size_t)(eq - (s + a));
            for (j = 0; j < count; j++) {
                if (key_len[j] == key_len[count] && memcmp(keys[j], keys[count], key_len[j]) == 0) {
                    *why = "a key appears twice";
                    return 0;
                }
            }
            count++;
        }
        if (end == NULL)
            break;
        pos = stop + 1;
    }
    return 1;
}
