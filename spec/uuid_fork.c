/*
 * For spec/uuid_spec.lua: makes one id (so that the random pool is filled), forks, and then the
 * parent and the child each make COUNT ids at once; prints the parent's, then the child's, one a
 * line. Ids made in the same millisecond by two processes differ only in their random bits, so a
 * child that drew from a copy of its parent's pool would print the parent's ids again.
 *
 *   cc -std=gnu11 -Isrc/core spec/uuid_fork.c src/core/uuid.c src/core/error.c -lpthread
 */
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qx.h"

#define COUNT 20

static int make(char ids[COUNT][QX_UUID_STRLEN + 1])
{
    qx_error err;
    int i;
    for (i = 0; i < COUNT; i++)
        if (qx_uuid7(ids[i], &err) != QX_OK)
            return -1;
    return 0;
}

int main(void)
{
    char first[QX_UUID_STRLEN + 1], ids[COUNT][QX_UUID_STRLEN + 1];
    char child_ids[COUNT][QX_UUID_STRLEN + 1];
    qx_error err;
    int fds[2], status, i;
    pid_t pid;

    if (qx_uuid7(first, &err) != QX_OK || pipe(fds) != 0)
        return 1;
    pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0) {
        ssize_t w;
        close(fds[0]);
        if (make(ids) != 0)
            _exit(1);
        w = write(fds[1], ids, sizeof ids);
        _exit(w == (ssize_t)sizeof ids ? 0 : 1);
    }
    close(fds[1]);
    if (make(ids) != 0)
        return 1;
    if (read(fds[0], child_ids, sizeof child_ids) != (ssize_t)sizeof child_ids)
        return 1;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return 1;
    for (i = 0; i < COUNT; i++)
        printf("%s\n", ids[i]);
    for (i = 0; i < COUNT; i++)
        printf("%.*s\n", QX_UUID_STRLEN, child_ids[i]);
    return 0;
}
