#!/usr/bin/env bash
# scripts/setup.sh: install and build what gantry's tests and benchmarks need.
#
# Idempotent: every step checks first and does nothing when its work is done,
# so a second run costs a few seconds (dpkg queries, a no-op `cargo build`).
#
#   bash scripts/setup.sh [--skip-gantry-build]    run it
#   . scripts/setup.sh                             source it: the steps run in a
#                                                  subshell (strict mode and exit
#                                                  stay there), then the GANTRY_*
#                                                  variables are exported into
#                                                  your shell
#
# Environment:
#   GANTRY_SKIP_BUILD=1   do not build target/release/gantry (tests use debug
#                         builds through cargo; the benchmarks need it)
#   GANTRY_SETUP_FORCE=1  rebuild the C peers even when they look up to date
#   CARGO_TARGET_DIR      honoured; default <repo>/target
#
# Exports (also when run, for child processes started from here):
#   GANTRY_REPO, GANTRY_SHARED (<repo>/../shared), GANTRY_TARGET_DIR,
#   GANTRY_BIN (release gantry CLI), GANTRY_MPI_ALLREDUCE (C peer benchmark),
#   GANTRY_PY (Python with numpy and the openai client, for bench/peers/*.py
#   and API client tests), GANTRY_TORCH_PY (Python with torch, transformers,
#   safetensors and numpy: the PyTorch peers and launch/tests/hf_export.rs),
#   GANTRY_S3S_FS (the s3s-fs S3 test server, for checkpoint/ tests)
#
# Extension points: one `ensure_<dependency>` function per dependency, called
# in order from `setup_main`. To add one (the libtorch venv, the s3s-fs test
# server, ...), fill in its function below, make it check-then-act like the
# others, and add it to SETUP_STEPS.

if ! (return 0 2>/dev/null); then
    # Executed, not sourced.
    set -euo pipefail
fi

# ---------------------------------------------------------------- helpers

setup_log() { printf '==> %s\n' "$*" >&2; }
setup_die() {
    printf 'setup.sh: error: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly when root, through sudo otherwise.
setup_as_root() {
    if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        setup_die "need root (or sudo) to run: $*"
    fi
}

# True when a Debian package is fully installed (`dpkg -s` would also succeed
# for a removed package whose config files remain, hence the status check).
setup_pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

SETUP_APT_UPDATED=0
# Install the named Debian packages that are missing; `apt-get update` at most
# once per run, and only when something is missing.
setup_apt_install() {
    local missing=() p
    for p in "$@"; do
        setup_pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 || setup_die "missing packages (${missing[*]}) and no apt-get"
    local apt_opts=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
    if [[ $SETUP_APT_UPDATED -eq 0 ]]; then
        setup_log "apt-get update"
        setup_as_root env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update -qq
        SETUP_APT_UPDATED=1
    fi
    setup_log "apt-get install ${missing[*]}"
    setup_as_root env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------- paths

setup_paths() {
    GANTRY_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    GANTRY_SHARED="$(cd "$GANTRY_REPO/.." && pwd)/shared"
    local t="${CARGO_TARGET_DIR:-target}"
    [[ $t = /* ]] || t="$GANTRY_REPO/$t"
    GANTRY_TARGET_DIR="$t"
    GANTRY_BIN="$GANTRY_TARGET_DIR/release/gantry"
    GANTRY_MPI_ALLREDUCE="$GANTRY_TARGET_DIR/peers/mpi_allreduce"
    GANTRY_PY="$GANTRY_REPO/.tools/py/bin/python"
    # An explicit GANTRY_TORCH_PY wins (bench-lib.sh and the tests read it too).
    GANTRY_TORCH_PY="${GANTRY_TORCH_PY:-$GANTRY_REPO/.tools/torch-peer/bin/python}"
    GANTRY_S3S_FS="$GANTRY_REPO/.tools/bin/s3s-fs"
    # tch's build script reads LIBTORCH; the binaries find the libraries
    # through LD_LIBRARY_PATH (tch has no rpath).
    local site
    site="$(ls -d "$GANTRY_REPO"/.tools/torch-venv/lib/python3*/site-packages 2>/dev/null | head -n1 || true)"
    LIBTORCH="${site:-$GANTRY_REPO/.tools/torch-venv/lib/python3.11/site-packages}/torch"
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$LIBTORCH/lib:"*) ;;
        *) LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
    export LIBTORCH LD_LIBRARY_PATH
    export GANTRY_REPO GANTRY_SHARED GANTRY_TARGET_DIR GANTRY_BIN GANTRY_MPI_ALLREDUCE GANTRY_PY GANTRY_TORCH_PY
    export GANTRY_S3S_FS
}

# ---------------------------------------------------------------- dependencies

# Rust toolchain pieces the scripts call (preinstalled on the project machines).
ensure_rust() {
    command -v cargo >/dev/null 2>&1 || setup_die "cargo not found (install Rust 1.95 via rustup)"
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [[ ${#missing[@]} -gt 0 ]]; then
        command -v rustup >/dev/null 2>&1 || setup_die "missing ${missing[*]} and no rustup"
        setup_log "rustup component add ${missing[*]}"
        rustup component add "${missing[@]}"
    fi
}

# Open MPI 4.1 from Debian: the peer the collectives are measured against.
ensure_openmpi() {
    local pkgs=(openmpi-bin libopenmpi-dev)
    # mpicc is a wrapper around the system C compiler.
    command -v cc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
    setup_apt_install "${pkgs[@]}"
    command -v mpicc >/dev/null 2>&1 || setup_die "mpicc not found after installing Open MPI"
    command -v mpirun >/dev/null 2>&1 || setup_die "mpirun not found after installing Open MPI"
}

# bench/peers/mpi_allreduce.c -> target/peers/mpi_allreduce (rebuilt only when
# the source is newer than the binary).
ensure_mpi_peer() {
    local src="$GANTRY_REPO/bench/peers/mpi_allreduce.c"
    local out="$GANTRY_MPI_ALLREDUCE"
    if [[ ${GANTRY_SETUP_FORCE:-0} != 1 && -x $out && ! $src -nt $out ]]; then
        return 0
    fi
    setup_log "mpicc -O3 bench/peers/mpi_allreduce.c -> ${out#"$GANTRY_REPO"/}"
    mkdir -p "$(dirname "$out")"
    mpicc -O3 -Wall -Wextra -o "$out.tmp.$$" "$src"
    mv -f "$out.tmp.$$" "$out"
}

# The Python peers (bench/peers/*.py, e.g. megatron_read.py) and API client
# tests: a venv at .tools/py with numpy and the official OpenAI client from PyPI.
# Skipped when the venv's python already imports both at these versions.
SETUP_NUMPY_VERSION=2.4.6
SETUP_OPENAI_VERSION=2.54.0
ensure_python_peers() {
    local want="numpy $SETUP_NUMPY_VERSION openai $SETUP_OPENAI_VERSION"
    if [[ -x $GANTRY_PY ]] && [[ "$("$GANTRY_PY" -c 'import numpy, openai; print("numpy", numpy.__version__, "openai", openai.__version__)' 2>/dev/null)" == "$want" ]]; then
        return 0
    fi
    local venv="${GANTRY_PY%/bin/python}"
    # A venv made without ensurepip (Debian's python3-venv) has no pip: remake it.
    if ! [[ -x $GANTRY_PY ]] || ! "$GANTRY_PY" -m pip --version >/dev/null 2>&1; then
        setup_apt_install python3 python3-venv
        setup_log "python3 -m venv ${venv#"$GANTRY_REPO"/}"
        python3 -m venv --clear "$venv"
    fi
    setup_log "pip install numpy==$SETUP_NUMPY_VERSION openai==$SETUP_OPENAI_VERSION into ${venv#"$GANTRY_REPO"/}"
    "$GANTRY_PY" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
        "numpy==$SETUP_NUMPY_VERSION" "openai==$SETUP_OPENAI_VERSION"
    "$GANTRY_PY" -c 'import numpy, openai' || setup_die "numpy or openai does not import in $venv after installing them"
}

# The PyPI PyTorch peer: a venv at .tools/torch-peer with torch (PyPI's CUDA
# build, which imports and runs on CPU; about 4.9 GB with its nvidia packages),
# transformers, safetensors and numpy. The PyTorch benchmarks (bench-lib.sh's
# torch_peer_python) and launch/tests/hf_export.rs (exports loaded by
# transformers) use it. Separate from .tools/torch-venv, whose --no-deps torch
# cannot `import torch`. Skipped when it already imports all four; pip's cache
# is off so CI's disk does not also hold a 2.5 GB copy of the wheels.
SETUP_HF_PEER_PKGS=(torch==2.11.0 transformers==5.25.0 safetensors==0.8.0 "numpy==$SETUP_NUMPY_VERSION")
ensure_hf_peer() {
    local py="$GANTRY_TORCH_PY"
    if [[ -x $py ]] && "$py" -c 'import torch, transformers, safetensors, numpy' >/dev/null 2>&1; then
        return 0
    fi
    local venv="${py%/bin/python}"
    if ! [[ -x $py ]] || ! "$py" -m pip --version >/dev/null 2>&1; then
        setup_apt_install python3 python3-venv
        setup_log "python3 -m venv ${venv#"$GANTRY_REPO"/}"
        python3 -m venv --clear "$venv"
    fi
    setup_log "pip install ${SETUP_HF_PEER_PKGS[*]} into ${venv#"$GANTRY_REPO"/} (about 4.9 GB, a few minutes)"
    "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${SETUP_HF_PEER_PKGS[@]}"
    local err
    err=$("$py" -c 'import torch, transformers, safetensors, numpy' 2>&1) ||
        setup_die "torch/transformers do not import in $venv after installing them: $(tail -n1 <<<"$err")"
}

# The gantry CLI, release build (the benchmarks run it).
ensure_gantry_build() {
    if [[ ${GANTRY_SKIP_BUILD:-0} == 1 ]]; then
        setup_log "skipping gantry release build (GANTRY_SKIP_BUILD=1)"
        return 0
    fi
    local locked=()
    [[ -f $GANTRY_REPO/Cargo.lock ]] && locked=(--locked)
    setup_log "cargo build --release -p gantry ${locked[*]}"
    (cd "$GANTRY_REPO" && cargo build --release -p gantry "${locked[@]}")
    [[ -x $GANTRY_BIN ]] || setup_die "build finished but $GANTRY_BIN is missing"
}

# libtorch 2.11.0 for tch 0.24.0 (train/ only), from PyPI (shared/FACTS.md):
# PyPI has no CPU-only torch wheel for x86_64, so install the CUDA wheel
# without its ~4.7 GB of nvidia dependencies, plus the two small libraries
# libtorch_cpu needs at load time (libcudart.so.13, libcupti.so.13). `import
# torch` fails in this venv; that is fine: only the shared libraries are used.
# Skipped when the marker file says this exact set is installed.
SETUP_TORCH_PKGS=(torch==2.11.0 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85)
ensure_libtorch() {
    local venv="$GANTRY_REPO/.tools/torch-venv"
    local marker="$venv/.gantry-installed"
    if [[ -f $marker && "$(cat "$marker")" == "${SETUP_TORCH_PKGS[*]}" && -f $GANTRY_REPO/.tools/libtorch/lib/libtorch_cpu.so ]]; then
        return 0
    fi
    if ! [[ -x $venv/bin/python ]] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        setup_apt_install python3 python3-venv
        setup_log "python3 -m venv ${venv#"$GANTRY_REPO"/}"
        python3 -m venv --clear "$venv"
    fi
    setup_log "pip install --no-deps ${SETUP_TORCH_PKGS[*]} (about 530 MB)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${SETUP_TORCH_PKGS[@]}"
    setup_paths
    [[ -f $LIBTORCH/lib/libtorch_cpu.so ]] || setup_die "libtorch_cpu.so missing under $LIBTORCH after pip install"
    # A stable path for .cargo/config.toml's LIBTORCH (the venv's site-packages
    # path carries the Python version).
    ln -sfn "$LIBTORCH" "$GANTRY_REPO/.tools/libtorch"
    printf '%s' "${SETUP_TORCH_PKGS[*]}" >"$marker"
}

# The S3 test server for checkpoint/'s object-store tests: s3s-fs from
# crates.io, built into .tools/bin (0.14.1: later releases need a newer rustc).
# Skipped when .tools/bin/s3s-fs already reports this version.
SETUP_S3S_FS_VERSION=0.14.1
ensure_s3s_fs() {
    local bin="$GANTRY_S3S_FS"
    if [[ -x $bin ]] && "$bin" --version 2>/dev/null | grep -qw -- "$SETUP_S3S_FS_VERSION"; then
        return 0
    fi
    setup_log "cargo install s3s-fs@$SETUP_S3S_FS_VERSION --features binary --locked --root .tools (a few minutes)"
    # A test server: opt-level 1 and many codegen units roughly halve its build on 2 cores,
    # and it still serves far faster than the tests need.
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_LTO=false \
        cargo install "s3s-fs@$SETUP_S3S_FS_VERSION" --features binary --locked --force --root "$GANTRY_REPO/.tools"
    [[ -x $bin ]] || setup_die "cargo install finished but $bin is missing"
    "$bin" --version 2>/dev/null | grep -qw -- "$SETUP_S3S_FS_VERSION" ||
        setup_die "$bin does not report version $SETUP_S3S_FS_VERSION after installing it"
}

# ---------------------------------------------------------------- main

# Order matters: the peer build needs Open MPI.
SETUP_STEPS=(ensure_rust ensure_openmpi ensure_mpi_peer ensure_python_peers ensure_hf_peer ensure_libtorch ensure_s3s_fs
    ensure_gantry_build)

setup_main() {
    local arg
    for arg in "$@"; do
        case $arg in
            --skip-gantry-build) GANTRY_SKIP_BUILD=1 ;;
            -h | --help)
                sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
                return 0
                ;;
            *) setup_die "unknown argument: $arg" ;;
        esac
    done
    setup_paths
    local step
    for step in "${SETUP_STEPS[@]}"; do
        "$step"
    done
    setup_log "setup done"
}

if (return 0 2>/dev/null); then
    # Sourced: keep strict mode and `exit` out of the caller's shell. (Not
    # `( ... ) || return`: errexit is ignored inside the left side of `||`.)
    (
        set -euo pipefail
        setup_main "$@"
    )
    _gantry_setup_rc=$?
    if [[ $_gantry_setup_rc -ne 0 ]]; then
        unset _gantry_setup_rc
        return 1
    fi
    unset _gantry_setup_rc
    setup_paths
else
    setup_main "$@"
fi
