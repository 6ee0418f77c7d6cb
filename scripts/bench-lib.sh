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

# Runs scripts/setup.sh (its log on stderr) and sets TARGET_DIR (absolute) and GANTRY_BIN
# (the release binary unless GANTRY_BIN is set); dies when the binary is missing.
# shellcheck disable=SC2034 # TARGET_DIR is read by the calling scripts
bench_setup() {
    log "setup"
    bash scripts/setup.sh >&2
    TARGET_DIR="${CARGO_TARGET_DIR:-target}"
    [[ $TARGET_DIR = /* ]] || TARGET_DIR="$PWD/$TARGET_DIR"
    GANTRY_BIN=${GANTRY_BIN:-$TARGET_DIR/release/gantry}
    [[ -x $GANTRY_BIN ]] || die "$GANTRY_BIN not found (build it: bash scripts/setup.sh)"
}

# Sets TORCH_PY to a Python whose `import torch` works on this machine, for the PyTorch peers
# (DCP, eager training, DDP, torchrun): TORCH_PYTHON when set, else GANTRY_TORCH_PY, else
# .tools/torch-peer: the venv scripts/setup.sh makes (ensure_hf_peer: PyPI's torch 2.11.0 with
# its NVIDIA packages, transformers, safetensors, numpy; about 4.9 GB, a few minutes once: PyPI
# has no CPU-only wheel, and the --no-deps libtorch venv that tch links against cannot
# `import torch`). Runs setup when that venv does not import yet; dies when it still does not.
torch_peer_python() {
    if [[ -n ${TORCH_PYTHON:-} ]]; then
        TORCH_PY=$TORCH_PYTHON
    else
        TORCH_PY=${GANTRY_TORCH_PY:-$PWD/.tools/torch-peer/bin/python}
        if ! "$TORCH_PY" -c 'import torch.distributed.checkpoint' >/dev/null 2>&1; then
            log "making the torch peer venv ($TORCH_PY) with scripts/setup.sh (about 4.9 GB, once)"
            GANTRY_SKIP_BUILD=1 GANTRY_TORCH_PY=$TORCH_PY bash scripts/setup.sh >&2 ||
                die "scripts/setup.sh failed to make the torch peer venv"
        fi
    fi
    local err
    err=$("$TORCH_PY" -c 'import torch.distributed.checkpoint' 2>&1) ||
        die "PyTorch does not import with $TORCH_PY: $(tail -n1 <<<"$err")"
}
