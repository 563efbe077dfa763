# qx — build, test, demo, bench.
#
#   make                 build/lua5.4/qx/core.so and build/luajit/qx/core.so
#   make asan            build/asan/qx/core.so (Lua 5.4, AddressSanitizer + UBSan)
#   make tsan            build/tsan/qx/core.so and build/tsan/bin/lua5.4 (ThreadSanitizer)
#   make lint            luacheck lua spec bench (.luacheckrc); a second or two
#   make docs            the HTML API reference from the doc comments (LDoc, config.ld) in
#                        build/docs/index.html; fails on an LDoc error
#   make check           the quick loop: build lua5.4, the specs not tagged #slow on Lua 5.4
#                        only, on the servers running in .run/dev (CHECK_DIR) or on a pair
#                        started and stopped for it; about 30 s on two busy cores
#   make test            deps, STRICT build, lint, servers, every spec on Lua 5.4 and LuaJIT
#                        (~1.5 min each), ASan, valgrind (the longest: many minutes), and the
#                        relay/consumer specs under TSan (spec/messaging, ~1 min); stops servers
#   make demo            the demo's packages (scripts/deps.sh demo), the Lua 5.4 build, servers,
#                        lua5.4 examples/demo.lua; one line a step, the rest in .run/setup.log
#   make bench           the bench's packages, build, servers, bench/run.sh
#   make rock            luarocks make into build/rocks (offline check of the rockspec)
#   make rockspec        regenerate rockspec/qx-scm-1.rockspec and the release's
#                        rockspec/qx-VERSION-1.rockspec (VERSION: lua/qx/version.lua)
#   make rockspec-check  fail when a rockspec misses (or lists stale) sources
#   make deps            apt-get what is missing of every group (root; scripts/deps.sh)
#   make env             servers for your own code (RUN_DIR): eval "$(make -s env)" (docs/guide.md)
#   make servers-start / servers-stop / servers-status   (RUN_DIR, default .run), then
#                        . .run/env && busted --lua=lua5.4   (or --lua=luajit --run=luajit)
#   make clean
#
# Variables: STRICT=1 adds -Werror. CFLAGS (default -O2 -g), EXTRA_CFLAGS, LDFLAGS, CC.
# check: CHECK_DIR, SPECS, BUSTED_ARGS (see scripts/check.sh).
# test: TEST_RUNS, SPECS, VALGRIND_SPECS, TSAN_SPECS, BUSTED_ARGS, TEST_DIR, TEST_TIMEOUT, ASAN_LEAKS
#       (see scripts/test.sh). demo/bench: DEMO_DIR (.run/demo), BENCH_DIR (.run/bench).

CC       ?= gcc
CFLAGS   ?= -O2 -g
STRICT   ?= 0
RUN_DIR  ?= .run
DEMO_DIR ?= .run/demo
BENCH_DIR ?= .run/bench

SRCS := $(sort $(wildcard src/core/*.c) $(wildcard src/lua/*.c))

WARN      := -Wall -Wextra$(if $(filter 1,$(STRICT)), -Werror)
BASEFLAGS := -fPIC -std=gnu11 $(WARN) -I/usr/include/postgresql -Isrc/core
LIBS      := -lpq -lnats -lcrypto -lpthread

LUA54_INC  := -I/usr/include/lua5.4
LUAJIT_INC := -I/usr/include/luajit-2.1
ASAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
              -fno-sanitize-recover=undefined
TSAN_FLAGS := -O1 -g -fsanitize=thread -fno-omit-frame-pointer

# Per variant: compile flags and link flags.
lua5.4_CFLAGS  := $(strip $(CFLAGS) $(BASEFLAGS) $(LUA54_INC) $(EXTRA_CFLAGS))
lua5.4_LDFLAGS := $(strip $(LDFLAGS))
luajit_CFLAGS  := $(strip $(CFLAGS) $(BASEFLAGS) $(LUAJIT_INC) $(EXTRA_CFLAGS))
luajit_LDFLAGS := $(strip $(LDFLAGS))
asan_CFLAGS    := $(strip $(ASAN_FLAGS) $(BASEFLAGS) $(LUA54_INC) $(EXTRA_CFLAGS))
asan_LDFLAGS   := $(strip -fsanitize=address,undefined $(LDFLAGS))
tsan_CFLAGS    := $(strip $(TSAN_FLAGS) $(BASEFLAGS) $(LUA54_INC) $(EXTRA_CFLAGS))
tsan_LDFLAGS   := $(strip -fsanitize=thread $(LDFLAGS))

VARIANTS := lua5.4 luajit asan tsan

objs = $(patsubst %.c,build/$(1)/obj/%.o,$(SRCS))

.PHONY: all lua5.4 luajit asan tsan lint check deps servers-start servers-stop servers-status env test demo \
        bench docs \
        rock rockspec rockspec-check clean check-sources FORCE

all: lua5.4 luajit

lua5.4: build/lua5.4/qx/core.so
luajit: build/luajit/qx/core.so
asan:   build/asan/qx/core.so build/asan/bin/lua5.4
tsan:   build/tsan/qx/core.so build/tsan/bin/lua5.4

# The sanitizer runs' interpreters: Lua 5.4 from the static liblua5.4.a with the sanitizer
# runtime linked in (no LD_PRELOAD to leak into child processes; see spec/lua-sanitized.c).
# The asan and tsan runs put build/<run>/bin first on PATH, so a spec's child `lua5.4` is
# the sanitized one too.
build/asan/bin/lua5.4: spec/lua-sanitized.c build/asan/flags
	@mkdir -p $(@D)
	$(CC) $(ASAN_FLAGS) -std=gnu11 -Wall -Wextra $(LUA54_INC) $< -o $@ -Wl,-E -l:liblua5.4.a -lm -ldl

build/tsan/bin/lua5.4: spec/lua-sanitized.c build/tsan/flags
	@mkdir -p $(@D)
	$(CC) $(TSAN_FLAGS) -std=gnu11 -Wall -Wextra $(LUA54_INC) $< -o $@ -Wl,-E -l:liblua5.4.a -lm -ldl

check-sources:
	@test -n "$(SRCS)" || { echo "no C sources in src/core or src/lua" >&2; exit 1; }

# One rule set per variant: objects mirror the source path (src/core/pool.c and
# src/lua/pool.c may both exist), -MMD -MP dependency files sit next to them, and a flags
# file rebuilds everything when the flags change (e.g. STRICT=1 after a normal build).
define variant
build/$(1)/flags: FORCE
	@mkdir -p $$(@D)
	@echo '$$(CC) $$($(1)_CFLAGS) | $$($(1)_LDFLAGS) $$(LIBS)' | cmp -s - $$@ || \
	  echo '$$(CC) $$($(1)_CFLAGS) | $$($(1)_LDFLAGS) $$(LIBS)' > $$@

build/$(1)/obj/%.o: %.c build/$(1)/flags
	@mkdir -p $$(@D)
	$$(CC) $$($(1)_CFLAGS) -MMD -MP -c $$< -o $$@

build/$(1)/qx/core.so: $(call objs,$(1)) build/$(1)/flags | check-sources
	@mkdir -p $$(@D)
	$$(CC) -shared -o $$@ $(call objs,$(1)) $$($(1)_LDFLAGS) $$(LIBS)

-include $(patsubst %.o,%.d,$(call objs,$(1)))
endef
$(foreach v,$(VARIANTS),$(eval $(call variant,$(v))))

FORCE:

deps:
	@bash scripts/deps.sh

# luacheck over the Lua layer, the specs and the benchmarks (.luacheckrc); no warning passes.
lint:
	luacheck --no-color -q lua spec bench

# The API reference: LDoc reads the doc comments of lua/qx (config.ld). LDoc reports a broken
# comment as a warning line and still exits 0, so any line naming a file fails the build too.
docs:
	@bash scripts/deps.sh docs
	@bash scripts/docs.sh

servers-start:
	@bash scripts/servers.sh start $(RUN_DIR)

servers-stop:
	@bash scripts/servers.sh stop $(RUN_DIR)

servers-status:
	@bash scripts/servers.sh status $(RUN_DIR)

# Servers for your own code: starts them in RUN_DIR when they are not up and prints the export
# lines (QX_DB__URL, QX_NATS__SERVERS, LUA_PATH_5_4/LUA_CPATH_5_4, PATH): eval "$(make -s env)"
env: lua5.4
	@bash scripts/servers.sh env $(RUN_DIR)

# The quick loop: the specs not tagged #slow on Lua 5.4, on the servers running in CHECK_DIR
# (default .run/dev) or on a pair started and stopped for it (scripts/check.sh).
check: lua5.4
	@bash scripts/check.sh

# Everything (deps, build, servers, runs, summary) lives in scripts/test.sh so that the
# servers are always stopped and the closing "N passed, N failed" line is always printed.
test:
	@MAKE='$(MAKE)' bash scripts/test.sh

# The demo's set-up (its packages, the Lua 5.4 build, servers) prints one line a step; the
# output goes to .run/setup.log (scripts/demo.sh).
demo:
	@MAKE='$(MAKE)' DEMO_DIR='$(DEMO_DIR)' bash scripts/demo.sh

bench:
	@bash scripts/deps.sh bench
	@$(MAKE) --no-print-directory all
	@bash scripts/with-servers.sh $(BENCH_DIR) bash bench/run.sh

# scripts/rock.sh builds in a copy: luarocks' builtin backend would leave ./qx/core.so here.
rock: check-sources
	bash scripts/rock.sh 5.4 --tree build/rocks

rockspec:
	@bash scripts/rockspec.sh --write

rockspec-check:
	@bash scripts/rockspec.sh --check

clean:
	rm -rf build luacov.stats.out luacov.report.out
	rm -f src/core/*.o src/lua/*.o
