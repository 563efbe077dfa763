/* A growable text buffer (see internal.h). */
#include <stdlib.h>

#include "internal.h"

void qx_buf_init(qx_buf *b, char *storage, size_t cap)
{
    b->p = storage;
    b->len = 0;
    b->cap = storage != NULL ? cap : 0;
    b->failed = 0;
    b->fixed = storage;
    b->fixed_cap = b->cap;
    if (storage != NULL && cap > 0)
        storage[0] = '\0';
}

int qx_buf_grow(qx_buf *b, size_t n)
{
    size_t cap = b->cap > 0 ? b->cap * 2 : 256;
    char *p;
    if (b->failed)
        return 0;
    while (cap < b->len + n + 1)
        cap *= 2;
    if (b->p == b->fixed) {
        p = malloc(cap);
        if (p != NULL && b->len > 0)
            memcpy(p, b->p, b->len);
    } else {
        p = realloc(b->p, cap);
    }
    if (p == NULL) {
        b->failed = 1;
        return 0;
    }
    b->p = p;
    b->cap = cap;
    return 1;
}

void qx_buf_free(qx_buf *b)
{
    if (b->p != b->fixed)
        free(b->p);
    qx_buf_init(b, b->fixed, b->fixed_cap);
}

int qx_buf_append_quoted(qx_buf *b, const char *s)
{
    qx_buf_append(b, "\"", 1);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            qx_buf_append(b, "\\", 1);
        qx_buf_append(b, s, 1);
    }
    return qx_buf_append(b, "\"", 1);
}
