#!/usr/bin/env bash
# `make test`: deps, STRICT build, lint, throwaway servers, then the spec suite under
#   lua5.4    Lua 5.4 with build/lua5.4/qx/core.so
#   luajit    LuaJIT with build/luajit/qx/core.so
#   asan      build/asan/bin/lua5.4 (a Lua 5.4 interpreter with the ASan runtime linked in, first
#             on PATH so child `lua5.4`s are sanitized too) with the ASan+UBSan
#             build/asan/qx/core.so; LeakSanitizer on (spec/lsan.supp)
#   valgrind  valgrind memcheck of lua5.4 with build/lua5.4/qx/core.so; definite leaks are errors
#             (spec/valgrind.supp); specs tagged #novalgrind or #slow are skipped in this run
#             (the slow ones drive the same C paths as the others, for longer; ASan runs them)
#   tsan      build/tsan/bin/lua5.4 (Lua 5.4 with the ThreadSanitizer runtime linked in, first on
#             PATH) with the TSan build/tsan/qx/core.so, on the specs whose C code runs on other
#             threads (TSAN_SPECS: the relay's ack handler on nats.c's threads, its marking
#             thread); any report fails the run, in busted's process or in a relay process a
#             spec starts (TEST_DIR/logs/tsan-report.PID; suppressions for libnats/libpq only:
#             spec/tsan.supp)
# It says at its start how long it takes: about 9-11 minutes on two cores for the five runs, most
# of it valgrind's. The servers are stopped whatever happens. Each run prints one summary line,
# then the failing specs are named (busted's "file:line: test name", from each run's log), with
# the first lines of why each failed and the logs' folder; the last line is "N passed, N failed"
# (every run added up; a run that fails without a failing spec — a crash, a sanitizer or
# valgrind report, a timeout — counts as one failure, and so does a failed step: deps, build,
# rockspec check, lint (luacheck lua spec bench), docs, server start).
# The exit code is the first failure's.
#
# Environment (all optional):
#   TEST_RUNS        runs to do, in order          (default "lua5.4 luajit asan valgrind tsan")
#   SPECS            spec files/folders for busted (default "spec")
#   VALGRIND_SPECS   the same for the valgrind run (default $SPECS)
#   TSAN_SPECS       the same for the tsan run     (default spec/messaging)
#   BUSTED_ARGS      extra busted arguments, e.g. "--tags=pool" or "--filter=batch"
#   TEST_DIR         servers' folder               (default .run/test; logs in TEST_DIR/logs)
#   TEST_TIMEOUT     seconds per run               (default 900; valgrind: VALGRIND_TIMEOUT 1800)
#   ASAN_LEAKS=0     turn LeakSanitizer off in the asan run
#   QX_FAST_PG       fsync off for the test cluster (default 1 here)
#   MAKE             make program (set by the Makefile)
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

MAKE=${MAKE:-make}
TEST_RUNS=${TEST_RUNS:-lua5.4 luajit asan valgrind tsan}
SPECS=${SPECS:-spec}
VALGRIND_SPECS=${VALGRIND_SPECS:-$SPECS}
TSAN_SPECS=${TSAN_SPECS:-spec/messaging}
BUSTED_ARGS=${BUSTED_ARGS:-}
TEST_DIR=${TEST_DIR:-.run/test}
TEST_TIMEOUT=${TEST_TIMEOUT:-900}
VALGRIND_TIMEOUT=${VALGRIND_TIMEOUT:-1800}
ASAN_LEAKS=${ASAN_LEAKS:-1}
export QX_FAST_PG=${QX_FAST_PG:-1}

mkdir -p "$TEST_DIR/logs"
summary_file=$TEST_DIR/summary
rm -f "$summary_file"

total_passed=0
total_failed=0
first_rc=0
lines=()
failing=()
failing_why=()
servers_up=0

note_failure() { # rc
  local rc=$1
  [ "$rc" -ne 0 ] || rc=1
  [ "$first_rc" -ne 0 ] || first_rc=$rc
}

# A step that is not a spec run: one failure when it fails.
step() { # name command...
  local name=$1 rc
  shift
  echo "=== $name"
  "$@"
  rc=$?
  if [ $rc -ne 0 ]; then
    total_failed=$((total_failed + 1))
    note_failure $rc
    lines+=("$name: FAILED (exit $rc)")
    return $rc
  fi
  return 0
}

stop_servers() {
  if [ "$servers_up" = 1 ]; then
    servers_up=0
    bash scripts/servers.sh stop "$TEST_DIR" || true
  fi
}

finish() {
  stop_servers
  echo
  echo "=== summary"
  local l
  for l in "${lines[@]}"; do echo "$l"; done
  if [ ${#failing[@]} -gt 0 ]; then
    echo "failing specs:"
    for l in "${failing[@]}"; do echo "  $l"; done
  fi
  if [ ${#failing_why[@]} -gt 0 ]; then
    echo "why (each failure's first lines):"
    for l in "${failing_why[@]}"; do echo "  $l"; done
  fi
  echo "logs: $TEST_DIR/logs (a run's output in RUN.log, each test's time in RUN.progress)"
  echo "$total_passed passed, $total_failed failed" | tee "$summary_file"
  [ "$first_rc" -eq 0 ] && [ "$total_failed" -eq 0 ] && exit 0
  [ "$first_rc" -ne 0 ] && exit "$first_rc"
  exit 1
}

trap 'stop_servers' EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "terminated" >&2; exit 143' TERM

has_run() { case " $TEST_RUNS " in *" $1 "*) return 0 ;; esac; return 1; }

# What a run that died or was killed leaves to explain itself, since busted printed no failure
# details: the failures spec/qx_output.lua wrote to the progress file as they happened, the
# free disk, and the ends of the shared servers' logs.
run_died_report() {
  local name=$1 progress=$2
  if grep -q '^failed ' "$progress" 2>/dev/null; then
    echo "$name: the failures before it ended:"
    awk '/^failed / { on = 1; print; next } /^  / { if (on) print; next } { on = 0 }' "$progress" |
      head -n 200
  fi
  echo "$name: free disk: $(df -h "$TEST_DIR" 2>/dev/null | awk 'NR == 2 { print $4 " of " $2 }')"
  local f
  for f in "${QX_TEST_NATS_LOG:-}" "${QX_TEST_PG_LOG:-}"; do
    [ -n "$f" ] && [ -f "$f" ] || continue
    echo "$name: the last lines of $f:"
    tail -n 15 "$f" | sed 's/^/  /'
  done
}

# One busted run: NAME TIMEOUT SPECS COMMAND...; the summary line of busted's plainTerminal
# ("N successes / N failures / N errors / N pending : T seconds", printed by
# spec/qx_output.lua) gives the counts.
busted_run() {
  local name=$1 limit=$2 specs=$3 log progress rc line s f e p failed t0 t1 extra=""
  shift 3
  log=$TEST_DIR/logs/$name.log
  progress=$TEST_DIR/logs/$name.progress
  rm -f "$progress"
  echo
  local shown=$*
  echo "=== $name: ${shown//"$PATH"/\$PATH}"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  QX_TEST_PROGRESS=$progress timeout --foreground -k 10 "$limit" "$@" $BUSTED_ARGS $specs 2>&1 \
    | tee "$log"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s)
  line=$(grep -aoE '[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' "$log" | tail -n 1)
  if [ -z "$line" ]; then
    s=0 f=0 e=0 p=0
    failed=1
    extra=" (no busted summary: crashed or did not start)"
  else
    read -r s f e p <<<"$(echo "$line" | grep -oE '[0-9]+' | tr '\n' ' ')"
    failed=$((f + e))
    if [ $rc -ne 0 ] && [ $failed -eq 0 ]; then
      failed=1
      extra=" (exit $rc after the specs: see the sanitizer/valgrind report above)"
    fi
  fi
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    extra=" (timed out after ${limit}s)$extra"
  fi
  if [ -z "$line" ] || [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    local last
    last=$(grep '^test ' "$progress" 2>/dev/null | tail -n 1 | cut -c6-)
    if [ -n "$last" ]; then
      extra="$extra; last test started: $last"
      echo
      echo "$name: the last test started was $last"
    fi
    run_died_report "$name" "$progress"
  fi
  if [ $failed -ne 0 ]; then note_failure $rc; fi
  # busted's failure headers: "Failure -> FILE @ LINE" (or "Error -> MESSAGE"), then the test's name
  local where test
  while IFS=$'\t' read -r where test; do
    failing+=("$name: $where: $test")
  done < <(awk '/^(Failure|Error) -> / {
      w = $0; sub(/^(Failure|Error) -> /, "", w); sub(/ @ /, ":", w)
      if ((getline n) <= 0) n = ""
      print w "\t" n
    }' "$log")
  # and why: the first lines of each failure's message, as spec/qx_output.lua wrote them to the
  # progress file (the summary is often all of a run's output that is kept)
  if [ $failed -ne 0 ] && [ -f "$progress" ]; then
    local why
    while IFS= read -r why; do
      failing_why+=("$why")
    done < <(awk -v run="$name" '/^failed / { on = 1; n = 0; print run ": " substr($0, 1, 300); next }
        /^  / { if (on && ++n <= 4) print "  " substr($0, 1, 300); next } { on = 0 }' "$progress")
  fi
  total_passed=$((total_passed + s))
  total_failed=$((total_failed + failed))
  lines+=("$name: $s passed, $failed failed, $p pending, exit $rc, $((t1 - t0)) s$extra")
}

# --- how long ----------------------------------------------------------------------------------
# Measured on two busy cores: lua5.4 about 5.5 min (with the #cluster specs, about 3 of it),
# luajit about 2.5, asan about 4, valgrind the longest, tsan 1.5; with deps, build and lint,
# 20-25 minutes for all five runs.
echo "make test: runs $TEST_RUNS; all five take about 20-25 minutes on two cores (valgrind the"
echo "longest), one run (e.g. TEST_RUNS=luajit) about 3 minutes; logs in $TEST_DIR/logs"

# --- deps and build -----------------------------------------------------------------------
step deps bash scripts/deps.sh test || finish

targets="all"
has_run asan && targets="$targets asan"
has_run tsan && targets="$targets tsan"
step "build (STRICT=1 $targets)" $MAKE --no-print-directory -j"$(nproc 2>/dev/null || echo 2)" STRICT=1 $targets \
  || finish

step "rockspec-check" bash scripts/rockspec.sh --check

step "lint (luacheck lua spec bench)" luacheck --no-color -q lua spec bench

# the API reference still builds (LDoc, no warning); spec/api_docs_spec.lua checks the comments
step "docs (ldoc, build/docs)" bash scripts/docs.sh

# --- servers --------------------------------------------------------------------------------
servers_up=1
if ! step "servers" bash scripts/servers.sh start "$TEST_DIR"; then
  finish
fi
set -a
# shellcheck disable=SC1090,SC1091
. "$TEST_DIR/env"
set +a

BUSTED=$(command -v busted) || { echo "busted not found" >&2; note_failure 1; total_failed=$((total_failed + 1)); finish; }
OUT=$root/spec/qx_output.lua

# --- runs -----------------------------------------------------------------------------------
for run in $TEST_RUNS; do
  case "$run" in
    lua5.4)
      busted_run lua5.4 "$TEST_TIMEOUT" "$SPECS" \
        lua5.4 "$BUSTED" -o "$OUT" --cpath='build/lua5.4/?.so'
      ;;
    luajit)
      busted_run luajit "$TEST_TIMEOUT" "$SPECS" \
        luajit "$BUSTED" -o "$OUT" --cpath='build/luajit/?.so' --exclude-tags=cluster
      ;;
    asan)
      busted_run asan "$TEST_TIMEOUT" "$SPECS" \
        env PATH="$root/build/asan/bin:$PATH" \
            ASAN_OPTIONS="detect_leaks=$ASAN_LEAKS:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=0" \
            LSAN_OPTIONS="suppressions=$root/spec/lsan.supp:print_suppressions=0" \
            UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        lua5.4 "$BUSTED" -o "$OUT" --cpath='build/asan/?.so' --exclude-tags=cluster
      ;;
    valgrind)
      busted_run valgrind "$VALGRIND_TIMEOUT" "$VALGRIND_SPECS" \
        valgrind -q --error-exitcode=99 --num-callers=30 --keep-debuginfo=yes \
          --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
          --suppressions="$root/spec/valgrind.supp" \
        lua5.4 "$BUSTED" -o "$OUT" --cpath='build/lua5.4/?.so' --exclude-tags=novalgrind,cluster,slow
      ;;
    tsan)
      # Reports go to files, one per process (log_path adds the pid), so that those of the
      # relay processes the specs start count too; they are shown after the run. A report in
      # busted's own process also makes it exit 66.
      case $TEST_DIR in /*) tsan_log=$TEST_DIR ;; *) tsan_log=$root/$TEST_DIR ;; esac
      tsan_log=$tsan_log/logs/tsan-report
      rm -f "$tsan_log".*
      busted_run tsan "$TEST_TIMEOUT" "$TSAN_SPECS" \
        env PATH="$root/build/tsan/bin:$PATH" \
            TSAN_OPTIONS="suppressions=$root/spec/tsan.supp:halt_on_error=0:exitcode=66:second_deadlock_stack=1:print_suppressions=0:log_path=$tsan_log" \
        lua5.4 "$BUSTED" -o "$OUT" --cpath='build/tsan/?.so' --exclude-tags=cluster
      tsan_reports=$(ls "$tsan_log".* 2>/dev/null)
      if [ -n "$tsan_reports" ]; then
        # shellcheck disable=SC2086
        cat $tsan_reports
        n=$(echo "$tsan_reports" | wc -l)
        case ${lines[${#lines[@]}-1]} in
          *", exit 0,"*)
            total_failed=$((total_failed + 1))
            note_failure 66
            lines+=("tsan: ThreadSanitizer reports from $n process(es), see $tsan_log.*") ;;
          *) lines+=("tsan: ThreadSanitizer reports from $n process(es), see $tsan_log.*") ;;
        esac
      fi
      ;;
    *)
      echo "unknown run '$run' in TEST_RUNS (lua5.4 luajit asan valgrind tsan)" >&2
      total_failed=$((total_failed + 1))
      note_failure 2
      lines+=("$run: unknown run")
      ;;
  esac
done

finish
