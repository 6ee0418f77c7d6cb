# shellcheck shell=bash
# Shared by the bench scripts (sourced, not run): logging, errors and the `--json` /
# `--help` arguments. The help text is the calling script's header comment, up to
# `set -euo pipefail`.

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$(basename "${BASH_SOURCE[-1]}")" "$*" >&2
    exit 2
}

# Sets JSON=1 for --json; prints the help for -h/--help; anything else is an error.
# shellcheck disable=SC2034 # JSON is read by the calling script
bench_args() {
    JSON=0
    local arg
    for arg in "$@"; do
        case $arg in
            --json) JSON=1 ;;
            -h | --help)
                sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[-1]}"
                exit 0
                ;;
            *) die "unknown argument: $arg (try --help)" ;;
        esac
    done
}
