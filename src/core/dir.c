/* Listing a folder: the names of the regular files in it (application migrations). */
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "qx.h"

void qx_dir_list_free(char **names, size_t count)
{
    size_t i;
    if (names == NULL)
        return;
    for (i = 0; i < count; i++)
        free(names[i]);
    free(names);
}

qx_status qx_dir_list(char ***names, size_t *count, const char *path, qx_error *err)
{
    DIR *d = NULL;
    struct dirent *ent;
    char **list = NULL;
    size_t n = 0, cap = 0;
    qx_status s = QX_OK;

    *names = NULL;
    *count = 0;
    d = opendir(path);
    if (d == NULL)
        return qx_error_set(err, errno == ENOENT ? QX_ERR_NOT_FOUND : QX_ERR_INVALID,
                            "cannot open folder %s: %s", path, strerror(errno));
    while ((ent = readdir(d)) != NULL) {
        char *full;
        struct stat st;
        size_t plen = strlen(path), nlen = strlen(ent->d_name);
        if (ent->d_name[0] == '.')
            continue;
        full = malloc(plen + nlen + 2);
        if (full == NULL) {
            s = qx_error_set(err, QX_ERR_NOMEM, "out of memory");
            break;
        }
        memcpy(full, path, plen);
        full[plen] = '/';
        memcpy(full + plen + 1, ent->d_name, nlen + 1);
        if (stat(full, &st) != 0 || !S_ISREG(st.st_mode)) {
            free(full);
            continue;
        }
        free(full);
        if (n == cap) {
            char **grown = realloc(list, (cap ? cap * 2 : 16) * sizeof *list);
            if (grown == NULL) {
                s = qx_error_set(err, QX_ERR_NOMEM, "out of memory");
                break;
            }
            list = grown;
            cap = cap ? cap * 2 : 16;
        }
        list[n] = strdup(ent->d_name);
        if (list[n] == NULL) {
            s = qx_error_set(err, QX_ERR_NOMEM, "out of memory");
            break;
        }
        n++;
    }
    closedir(d);
    if (s != QX_OK) {
        qx_dir_list_free(list, n);
        return s;
    }
    *names = list;
    *count = n;
    return QX_OK;
}
