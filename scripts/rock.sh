#!/usr/bin/env bash
# Installs qx with LuaRocks from this checkout and leaves the checkout as it was.
#
#   bash scripts/rock.sh 5.4    [ROCKSPEC] [luarocks make flags: --tree DIR, --local, ...]
#   bash scripts/rock.sh luajit [ROCKSPEC] [luarocks make flags]
#
# ROCKSPEC is rockspec/qx-scm-1.rockspec (the default) or the release's rockspec/qx-X.Y.Z-1.rockspec.
#
# Three things a plain `luarocks make` gets wrong here:
# - its builtin backend compiles next to the sources and links ./qx/core.so, which a `lua5.4`
#   started in the checkout later loads before the right build (undefined symbol: lua_tonumber);
#   so the build runs in a copy of the sources, removed afterwards, whatever happens.
# - `--lua-version 5.1` takes the first Lua 5.1 interpreter it finds (PUC lua5.1 when it is
#   installed) for the installed `qx` command; a configuration naming luajit as the interpreter
#   (and its headers) makes the LuaJIT rock's `qx` run LuaJIT. That configuration stands in for
#   the user's own LuaRocks configuration file for this one command (the system's still applies).
# - qx depends on the lua-cjson rock, which Debian ships as a system package (lua-cjson) that
#   LuaRocks does not see; when the interpreter already loads cjson, that configuration declares
#   it provided (rocks_provided), so the install neither fetches it nor fails offline.
set -euo pipefail

usage() { echo "usage: scripts/rock.sh 5.4|luajit [ROCKSPEC] [luarocks make flags]" >&2; exit 2; }
[ $# -ge 1 ] || usage
target=$1
shift
case "$target" in
    5.4) version=5.4 ;;
    luajit) version=5.1 ;;
    *) usage ;;
esac

rockspec=rockspec/qx-scm-1.rockspec
case "${1:-}" in *.rockspec) rockspec=rockspec/$(basename "$1"); shift ;; esac

here=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$here/$rockspec" ] || { echo "scripts/rock.sh: no $rockspec" >&2; exit 2; }
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

config=$work/config-$version.lua
: > "$config"
if [ "$target" = luajit ]; then
    lua=$(command -v luajit) || { echo "scripts/rock.sh: no luajit on PATH" >&2; exit 1; }
    incdir=$(pkg-config --cflags-only-I luajit 2>/dev/null | sed -n 's/^ *-I\([^ ]*\).*/\1/p')
    incdir=${incdir:-/usr/include/luajit-2.1}
    cat >> "$config" <<CONFIG
lua_interpreter = "$(basename "$lua")"
variables = { LUA_BINDIR = "$(dirname "$lua")", LUA_INCDIR = "$incdir" }
CONFIG
else
    lua=$(command -v lua5.4) || lua=
fi
# cjson as the system has it (its _VERSION, e.g. 2.1.0), offered to LuaRocks as the lua-cjson rock
cjson=$([ -n "$lua" ] && "$lua" -e 'local ok, c = pcall(require, "cjson") io.write(ok and c._VERSION or "")' 2>/dev/null) || cjson=
if [ -n "$cjson" ]; then
    echo "rocks_provided = { [\"lua-cjson\"] = \"$cjson-1\" }" >> "$config"
fi
export LUAROCKS_CONFIG_${version/./_}="$config"

cd "$work/qx"
luarocks --lua-version "$version" make "$rockspec" ${args[@]+"${args[@]}"}
