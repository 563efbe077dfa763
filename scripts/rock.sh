#!/usr/bin/env bash
# Installs qx with LuaRocks from this checkout and leaves the checkout as it was.
#
#   bash scripts/rock.sh 5.4    [luarocks make flags: --tree DIR, --local, --deps-mode=..., ...]
#   bash scripts/rock.sh luajit [luarocks make flags]
#
# Two things a plain `luarocks make` gets wrong here:
# - its builtin backend compiles next to the sources and links ./qx/core.so, which a `lua5.4`
#   started in the checkout later loads before the right build (undefined symbol: lua_tonumber);
#   so the build runs in a copy of the sources, removed afterwards, whatever happens.
# - `--lua-version 5.1` takes the first Lua 5.1 interpreter it finds (PUC lua5.1 when it is
#   installed) for the installed `qx` command; a configuration naming luajit as the interpreter
#   (and its headers) makes the LuaJIT rock's `qx` run LuaJIT. That configuration stands in for
#   the user's own LuaRocks configuration file for this one command (the system's still applies).
set -euo pipefail

usage() { echo "usage: scripts/rock.sh 5.4|luajit [luarocks make flags]" >&2; exit 2; }
[ $# -ge 1 ] || usage
target=$1
shift
case "$target" in
    5.4) version=5.4 ;;
    luajit) version=5.1 ;;
    *) usage ;;
esac

here=$(cd "$(dirname "$0")/.." && pwd)
caller=$(pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/qx-rock.XXXXXX")
trap 'rm -rf "$work"' EXIT

# luarocks runs in the copy: a relative --tree means the caller's folder
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tree) args+=("--tree" "$(cd "$caller" && realpath -m -- "$2")"); shift 2 ;;
        --tree=*) args+=("--tree=$(cd "$caller" && realpath -m -- "${1#--tree=}")"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done

mkdir -p "$work/qx"
cp -R "$here/src" "$here/lua" "$here/bin" "$here/rockspec" "$work/qx/"

if [ "$target" = luajit ]; then
    luajit=$(command -v luajit) || { echo "scripts/rock.sh: no luajit on PATH" >&2; exit 1; }
    incdir=$(pkg-config --cflags-only-I luajit 2>/dev/null | sed -n 's/^ *-I\([^ ]*\).*/\1/p')
    incdir=${incdir:-/usr/include/luajit-2.1}
    cat > "$work/config-5.1.lua" <<CONFIG
lua_interpreter = "$(basename "$luajit")"
variables = { LUA_BINDIR = "$(dirname "$luajit")", LUA_INCDIR = "$incdir" }
CONFIG
    export LUAROCKS_CONFIG_5_1="$work/config-5.1.lua"
fi

cd "$work/qx"
luarocks --lua-version "$version" make rockspec/qx-scm-1.rockspec ${args[@]+"${args[@]}"}
