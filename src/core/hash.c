/* Open-addressing hash tables (see internal.h). */
#include <stdlib.h>

#include "internal.h"

int qx_hash_capacity(int n)
{
    int c = 16;
    while (c < n)
        c <<= 1;
    return c;
}

int qx_ptrmap_init(qx_ptrmap *m, int max_entries)
{
    m->cap = qx_hash_capacity(max_entries * 2);
    m->keys = calloc((size_t)m->cap, sizeof *m->keys);
    m->vals = calloc((size_t)m->cap, sizeof *m->vals);
    return m->keys != NULL && m->vals != NULL;
}

void qx_ptrmap_free(qx_ptrmap *m)
{
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
    m->cap = 0;
}

void qx_ptrmap_clear(qx_ptrmap *m)
{
    if (m->keys != NULL)
        memset(m->keys, 0, sizeof *m->keys * (size_t)m->cap);
}

void qx_ptrmap_put(qx_ptrmap *m, const void *key, int val)
{
    unsigned int mask = (unsigned int)(m->cap - 1);
    unsigned int i = qx_hash_ptr(key) & mask;
    while (m->keys[i] != NULL)
        i = (i + 1) & mask;
    m->keys[i] = key;
    m->vals[i] = val;
}

int qx_ptrmap_take(qx_ptrmap *m, const void *key)
{
    unsigned int mask = (unsigned int)(m->cap - 1);
    unsigned int i = qx_hash_ptr(key) & mask, j;
    int val;
    for (;;) {
        if (m->keys[i] == NULL)
            return -1;
        if (m->keys[i] == key)
            break;
        i = (i + 1) & mask;
    }
    val = m->vals[i];
    m->keys[i] = NULL;
    for (j = (i + 1) & mask; m->keys[j] != NULL; j = (j + 1) & mask) {
        unsigned int home = qx_hash_ptr(m->keys[j]) & mask;
        /* move j back to i when its home is not in (i, j] (cyclically) */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            m->keys[j] = NULL;
            i = j;
        }
    }
    return val;
}

int qx_strmap_init(qx_strmap *m, int max_entries)
{
    m->cap = qx_hash_capacity(max_entries * 2);
    m->keys = calloc((size_t)m->cap, sizeof *m->keys);
    m->vals = calloc((size_t)m->cap, sizeof *m->vals);
    return m->keys != NULL && m->vals != NULL;
}

void qx_strmap_free(qx_strmap *m)
{
    free((void *)m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
    m->cap = 0;
}

void qx_strmap_clear(qx_strmap *m)
{
    if (m->keys != NULL)
        memset((void *)m->keys, 0, sizeof *m->keys * (size_t)m->cap);
}

int qx_strmap_swap(qx_strmap *m, const char *key, int val)
{
    unsigned int mask = (unsigned int)(m->cap - 1);
    unsigned int i = qx_hash_str(key) & mask;
    for (;;) {
        if (m->keys[i] == NULL) {
            m->keys[i] = key;
            m->vals[i] = val;
            return -1;
        }
        if (strcmp(m->keys[i], key) == 0) {
            int old = m->vals[i];
            m->vals[i] = val;
            return old;
        }
        i = (i + 1) & mask;
    }
}

int qx_strmap_get(const qx_strmap *m, const char *key)
{
    unsigned int mask = (unsigned int)(m->cap - 1);
    unsigned int i = qx_hash_str(key) & mask;
    for (;;) {
        if (m->keys[i] == NULL)
            return -1;
        if (strcmp(m->keys[i], key) == 0)
            return m->vals[i];
        i = (i + 1) & mask;
    }
}
