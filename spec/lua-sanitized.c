/*
 * A Lua 5.4 interpreter for the sanitizer runs of the specs. `make asan` builds it as
 * build/asan/bin/lua5.4 (AddressSanitizer + UBSan), `make tsan` as build/tsan/bin/lua5.4
 * (ThreadSanitizer); each run puts its folder first on PATH, so busted and every `lua5.4` a
 * spec starts (bin/qx's shebang included) run here:
 *
 *   lua5.4 [-e stat] [-l mod] [-l g=mod] [-v] [-E] [-W] [--] [script [args] | -]
 *
 * Built with -fsanitize=... against the static liblua5.4.a, so the sanitizer runtime comes with
 * the binary instead of LD_PRELOAD (which every child process would inherit: psql, for one,
 * hangs with the ASan runtime preloaded; TSan's runtime must be loaded before any thread starts).
 *
 * dlclose is a no-op here: Lua unloads C modules in lua_close, and LeakSanitizer reports leaks
 * after that; with the module still mapped, leak stacks keep their function names and the
 * suppressions in spec/lsan.supp can match them (and TSan's reports at exit symbolize too).
 *
 * What lua.c does for scripts, minus the REPL and LUA_INIT: the global `arg`, the script's
 * `...`, a traceback on an error, exit status 1 on an error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int dlclose(void *handle);
int dlclose(void *handle)
{
    (void)handle;
    return 0;
}

static const char *progname = "lua5.4";

static int msghandler(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
            return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static int report(lua_State *L, int status)
{
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        fprintf(stderr, "%s: %s\n", progname, msg ? msg : "(error object is not a string)");
        fflush(stderr);
        lua_pop(L, 1);
    }
    return status;
}

/* Calls the function under nargs arguments with the traceback handler. */
static int docall(lua_State *L, int narg, int nres)
{
    int status, base = lua_gettop(L) - narg;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base);
    status = lua_pcall(L, narg, nres, base);
    lua_remove(L, base);
    return status;
}

static int dostring(lua_State *L, const char *s, const char *name)
{
    int status = luaL_loadbuffer(L, s, strlen(s), name);
    if (status == LUA_OK)
        status = docall(L, 0, 0);
    return report(L, status);
}

/* -l mod, or -l g=mod: global g = require "mod" */
static int dolibrary(lua_State *L, char *spec)
{
    int status;
    char *eq = strchr(spec, '=');
    const char *glob = spec, *mod = spec;
    if (eq != NULL) {
        *eq = '\0';
        mod = eq + 1;
    }
    lua_getglobal(L, "require");
    lua_pushstring(L, mod);
    status = docall(L, 1, 1);
    if (status == LUA_OK)
        lua_setglobal(L, glob);
    return report(L, status);
}

static int pmain(lua_State *L)
{
    int argc = (int)lua_tointeger(L, 1);
    char **argv = (char **)lua_touserdata(L, 2);
    int i, script = 0, ran = 0, status, n;

    luaL_checkversion(L);

    /* find the script: the first argument that is not an option */
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-' || strcmp(a, "-") == 0) {
            script = i;
            break;
        }
        if (strcmp(a, "--") == 0) {
            script = i + 1 < argc ? i + 1 : 0;
            break;
        }
        if (strcmp(a, "-e") == 0 || strcmp(a, "-l") == 0) {
            if (++i >= argc)
                return luaL_error(L, "'%s' needs an argument", a);
        } else if (strcmp(a, "-v") != 0 && strcmp(a, "-E") != 0 && strcmp(a, "-W") != 0) {
            return luaL_error(L, "unrecognized option '%s' (this interpreter runs scripts only)", a);
        }
    }

    luaL_openlibs(L);

    /* arg: [0] = script, [1..] = its arguments, negative = interpreter and options;
       without a script, [0] = the interpreter (as lua.c does) */
    n = script;
    lua_createtable(L, argc - n, n);
    for (i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - n);
    }
    lua_setglobal(L, "arg");

    /* run the options in order */
    for (i = 1; i < (script ? script : argc); i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0)
            break;
        if (strcmp(a, "-e") == 0) {
            ran = 1;
            if (dostring(L, argv[++i], "=(command line)") != LUA_OK)
                return 0;
        } else if (strcmp(a, "-l") == 0) {
            if (dolibrary(L, argv[++i]) != LUA_OK)
                return 0;
        } else if (strcmp(a, "-v") == 0) {
            ran = 1;
            printf("%s\n", LUA_COPYRIGHT);
            fflush(stdout);
        } else if (strcmp(a, "-W") == 0) {
            lua_warning(L, "@on", 0);
        }
    }

    if (script || !ran) {
        const char *fname = NULL; /* stdin */
        if (script && strcmp(argv[script], "-") != 0)
            fname = argv[script];
        status = luaL_loadfile(L, fname);
        if (status == LUA_OK) {
            int nargs = script ? argc - script - 1 : 0;
            luaL_checkstack(L, nargs + 3, "too many arguments to script");
            for (i = 1; i <= nargs; i++)
                lua_pushstring(L, argv[script + i]);
            status = docall(L, nargs, LUA_MULTRET);
        }
        if (report(L, status) != LUA_OK)
            return 0;
    }
    lua_pushboolean(L, 1); /* success */
    return 1;
}

int main(int argc, char **argv)
{
    lua_State *L;
    int status, ok;

    if (argc > 0 && argv[0] && argv[0][0])
        progname = argv[0];
    L = luaL_newstate();
    if (L == NULL) {
        fprintf(stderr, "%s: cannot create state: not enough memory\n", progname);
        return EXIT_FAILURE;
    }
    lua_pushcfunction(L, pmain);
    lua_pushinteger(L, argc);
    lua_pushlightuserdata(L, argv);
    status = lua_pcall(L, 2, 1, 0);
    ok = lua_toboolean(L, -1);
    report(L, status);
    lua_close(L);
    return (status == LUA_OK && ok) ? EXIT_SUCCESS : EXIT_FAILURE;
}
