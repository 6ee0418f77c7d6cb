#!/usr/bin/env bash
# scripts/test.sh: the project's test command (CI runs it through .ci/run).
#
#   bash scripts/test.sh
#
# Phases: setup (scripts/setup.sh without the gantry release build: tests use
# debug builds through cargo; the C peer benchmark is still built, a smoke test
# may run it), cargo fmt --check, cargo clippy -D warnings, tests (cargo
# nextest when installed, else cargo test), doc tests (nextest does not run
# them). A failing setup stops at once; the other phases all run, then the
# script prints each phase's time and exits 1 if any failed.
#
# Environment:
#   GANTRY_TEST_BUILD_RELEASE=1   also build target/release/gantry in setup
#   NEXTEST_PROFILE, CARGO_*      passed through to cargo / nextest
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

log() { printf '==> %s\n' "$*" >&2; }

# --locked only when Cargo.lock is there (it is committed, so on a fresh clone
# it is): CI must not silently re-resolve dependencies.
LOCKED=()
[[ -f Cargo.lock ]] && LOCKED=(--locked)

# Fresh CI clones gain nothing from incremental compilation.
if [[ ${CI:-} == true && -z ${CARGO_INCREMENTAL:-} ]]; then
    export CARGO_INCREMENTAL=0
fi

PHASES=()
RESULTS=()
FAILED=0
TOTAL_START=$SECONDS

# run_phase NAME CMD...: run, record the time and the outcome, keep going.
run_phase() {
    local name=$1
    shift
    log "$name: $*"
    local start=$SECONDS rc=0
    "$@" || rc=$?
    local took=$((SECONDS - start))
    PHASES+=("$name")
    if [[ $rc -eq 0 ]]; then
        RESULTS+=("ok      ${took}s")
        log "$name: ok (${took}s)"
    else
        RESULTS+=("FAILED  ${took}s (exit $rc)")
        log "$name: FAILED (exit $rc, ${took}s)"
        FAILED=1
    fi
}

# free_disk: the space left where target/ lives. A clean build of every test binary
# needs several GB; a full disk shows up as the linker dying with SIGBUS, so the
# figure is printed before and after to make that failure readable.
free_disk() {
    df -h --output=avail "$REPO" 2>/dev/null | tail -1 | tr -d ' '
}

summary() {
    printf '\n==> summary (disk free now: %s)\n' "$(free_disk)" >&2
    local i
    for i in "${!PHASES[@]}"; do
        printf '    %-10s %s\n' "${PHASES[$i]}" "${RESULTS[$i]}" >&2
    done
    printf '    %-10s %ss\n' total "$((SECONDS - TOTAL_START))" >&2
}

log "disk free at start: $(free_disk)"

# 1. setup: a failure here means nothing below can be trusted; stop.
setup_skip=1
[[ ${GANTRY_TEST_BUILD_RELEASE:-0} == 1 ]] && setup_skip=0
run_phase setup env GANTRY_SKIP_BUILD="$setup_skip" bash scripts/setup.sh
if [[ $FAILED -ne 0 ]]; then
    summary
    exit 1
fi

# 2. formatting
run_phase fmt cargo fmt --all -- --check

# 3. lints
run_phase clippy cargo clippy --workspace --all-targets "${LOCKED[@]}" -- -D warnings

# 4. doc tests first (nextest does not run them), so the test runner's closing summary
#    below is the run's last word.
run_phase doctests cargo test --workspace --doc "${LOCKED[@]}" --no-fail-fast

# 5. tests
if cargo nextest --version >/dev/null 2>&1; then
    run_phase tests cargo nextest run --workspace "${LOCKED[@]}" --no-fail-fast --no-tests=warn
else
    log "cargo-nextest not found; using cargo test"
    run_phase tests cargo test --workspace "${LOCKED[@]}" --no-fail-fast
fi

summary
exit "$FAILED"
