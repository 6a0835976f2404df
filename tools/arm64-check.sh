#!/usr/bin/env bash
# The tilec runtime on arm64 (a Raspberry Pi's CPU), emulated on an x86 host.
#
# Builds (once, then cached) a Debian arm64 root with debootstrap and runs it
# through qemu-user-static (binfmt_misc), installs the runtime there with pip
# (numpy and scipy only: the device's part), starts two `tilec worker`
# processes inside it on loopback, and trains a small model on them for a few
# steps in float64 with `tilec train --cluster` from the host: the planner and
# the kernel generator run on x86, the arm64 workers build the generated C
# kernels with the arm64 gcc and train. The same plan is then trained on two
# x86 worker processes (`--devices 2`), and the final weights must agree to
# 1e-10 (max |arm64 - x86| over each tensor, relative to max(max |x86|, 1)).
#
#   sudo tools/arm64-check.sh                 # root cached in ~/.cache/tilec/arm64-root
#   sudo tools/arm64-check.sh --root /var/tmp/arm64-root --host-python venv/bin/python
#
# Needs root (debootstrap, chroot, mount, binfmt_misc), a Debian-like host
# (installs debootstrap, qemu-user-static, binfmt-support with apt-get when
# they are missing), a host Python with the planner's dependencies
# (`pip install -e .`), and network access to a Debian mirror and PyPI.
# Everything is driven through the CLI (`tilec worker`, `tilec compile`,
# `tilec train`), run from this checkout. Prints PASS or FAIL; exit status
# 0 on PASS, 1 on FAIL or any error.
set -euo pipefail

T0=$(date +%s.%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TREE=$(cd "$HERE/.." && pwd)

ROOT=${TILEC_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/tilec/arm64-root}
HOST_PY=${TILEC_HOST_PYTHON:-}
SUITE=${TILEC_ARM64_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MODEL=tiny
STEPS=2
TOL=1e-10
WORK=
REBUILD=0
KEEP_KERNELS=0
STARTUP_TIMEOUT=600  # s for an emulated worker to start listening
TRAIN_TIMEOUT=5400   # s for the emulated training run, kernel build included

usage() {
    cat <<EOF
usage: $0 [options]
  --root DIR          cached arm64 root (default \$TILEC_ARM64_ROOT or ~/.cache/tilec/arm64-root)
  --rebuild-root      delete the cached root first
  --host-python PY    host Python with tilec's dependencies (default \$TILEC_HOST_PYTHON,
                      else python3, else the Python of \`tilec\` on PATH)
  --model NAME        model to train (default tiny)
  --steps N           training steps (default 2)
  --tol T             largest relative difference allowed (default 1e-10)
  --work DIR          where plans, logs and weights go (default: a new /tmp/tilec-arm64-check.*)
  --keep-kernels      reuse kernels the arm64 root built before (default: build them again)
  --suite S           Debian suite (default bookworm); --mirror URL (default $MIRROR)
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=$2; shift 2 ;;
        --rebuild-root) REBUILD=1; shift ;;
        --host-python) HOST_PY=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --tol) TOL=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --keep-kernels) KEEP_KERNELS=1; shift ;;
        --suite) SUITE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "arm64-check: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

# -- output -----------------------------------------------------------------------------

elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%7.1f", b - a }'; }
say() { echo "[$(elapsed) s] $*"; }
die() { echo "[$(elapsed) s] arm64-check: error: $*" >&2; echo "arm64-check: FAIL (error; logs in ${WORK:-nowhere yet})"; exit 1; }
TIMES=()
stage_start() { STAGE=$1; STAGE_T=$(date +%s.%N); echo; say "== $1"; }
stage_end() {
    local s
    s=$(awk -v a="$STAGE_T" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    TIMES+=("$(printf '%-46s %7s s' "$STAGE${1:+ ($1)}" "$s")")
    say "   $STAGE: ${1:+$1, }$s s"
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount, binfmt_misc): run it with sudo"
case $ROOT in /|"") die "refusing --root '$ROOT'" ;; esac
ROOT=$(realpath -m "$ROOT")
mkdir -p "$(dirname "$ROOT")"
WORK=${WORK:-$(mktemp -d /tmp/tilec-arm64-check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")

# one run per root at a time: this run mounts into it and cleans its caches
exec 9>"$ROOT.lock"
flock -n 9 || die "another arm64-check is using $ROOT (lock $ROOT.lock)"

# -- clean-up -----------------------------------------------------------------------------

MOUNTED=()   # mount points this run made, unmounted in reverse order on exit
PIDS=()      # worker processes this run started
WATCHERS=()  # background loops watching them

cleanup() {
    local rc=$? pid i
    for pid in "${WATCHERS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" 2>/dev/null \
            || echo "arm64-check: could not unmount ${MOUNTED[i]}" >&2
    done
    return $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Deletes a (partial) root: never through a mount point (a bind-mounted /dev
# would take the host's with it).
remove_root() {
    local dir=$1 m
    [ -e "$dir" ] || return 0
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" || die "cannot unmount $m; remove $dir by hand"
    done < <(awk -v d="$dir/" 'index($2 "/", d) == 1 { print $2 }' /proc/mounts | sort -r)
    rm -rf --one-file-system "$dir"
}

# -- host tools -------------------------------------------------------------------------------

stage_start "host tools"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v arch-test >/dev/null || missing+=(arch-test)
command -v file >/dev/null || missing+=(file)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} (apt-get)"
    apt-get update -q >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log"; die "apt-get install ${missing[*]} failed"; }
fi

if [ -z "$HOST_PY" ]; then
    HOST_PY=python3
    if ! python3 -c "import numpy, scipy, networkx, yaml, ortools, jinja2, Cython" 2>/dev/null \
            && command -v tilec >/dev/null; then
        shebang=$(head -n1 "$(command -v tilec)")
        [ "${shebang#\#!}" != "$shebang" ] && HOST_PY=${shebang#\#!}
    fi
fi
"$HOST_PY" -c "import numpy, scipy, networkx, yaml, ortools, jinja2, Cython" 2>"$WORK/host-python.log" \
    || die "the host Python ($HOST_PY) lacks the planner's dependencies ($(tail -n1 "$WORK/host-python.log")):" \
           "pip install -e $TREE, or pass --host-python /path/to/venv/bin/python"
# this checkout's code, whatever the host Python has installed: tilec and
# tilec_runtime (the package lives in runtime/) through a PYTHONPATH shim
mkdir -p "$WORK/shim"
ln -sfn "$TREE/tilec" "$WORK/shim/tilec"
ln -sfn "$TREE/runtime" "$WORK/shim/tilec_runtime"
export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
host_tilec() { "$HOST_PY" -m tilec.cli "$@"; }
say "host: $(uname -m), $("$HOST_PY" -c 'import sys, platform, tilec, numpy, scipy; print(f"Python {platform.python_version()} ({sys.executable}), numpy {numpy.__version__}, scipy {scipy.__version__}, tilec from {tilec.__path__[0]}")')"
say "qemu: $(qemu-aarch64-static --version | head -n1)"
stage_end

# -- executing arm64 binaries: binfmt_misc --------------------------------------------------
#
# The root's programs (dpkg in debootstrap's second stage, python3, gcc and
# its cc1/as/ld) start each other with execve, so the kernel itself has to
# run aarch64 ELF files: binfmt_misc with qemu-aarch64-static as the
# interpreter. Running qemu-aarch64-static explicitly (`qemu-aarch64-static
# -L ROOT ROOT/usr/bin/python3`) runs one process, but every child it execs
# fails with "Exec format error", so that is no fallback for a build.

BINFMT=/proc/sys/fs/binfmt_misc
arm64_ok() { arch-test arm64 >/dev/null 2>&1; }

stage_start "binfmt_misc for aarch64"
if ! arm64_ok; then
    if [ ! -e $BINFMT/register ]; then
        say "mounting binfmt_misc on $BINFMT"
        mount -t binfmt_misc binfmt_misc $BINFMT || die "cannot mount binfmt_misc (a container without privileges?)"
    fi
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    if [ -e $BINFMT/qemu-aarch64 ] && ! grep -qx enabled $BINFMT/qemu-aarch64; then
        echo 1 > $BINFMT/qemu-aarch64 || true
    fi
    if [ ! -e $BINFMT/qemu-aarch64 ]; then
        # what qemu-user-static registers, by hand; F: the interpreter is
        # opened now, so it need not exist inside the chroot
        say "registering qemu-aarch64-static by hand"
        printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$(command -v qemu-aarch64-static)"':F' \
            > $BINFMT/register || true
    fi
fi
arm64_ok || die "this host cannot execute arm64 binaries (arch-test arm64: $(arch-test arm64 2>&1))"
INTERP=$(awk '$1 == "interpreter" { print $2 }' $BINFMT/qemu-aarch64 2>/dev/null || true)
FLAGS=$(awk '$1 == "flags:" { print $2 }' $BINFMT/qemu-aarch64 2>/dev/null || true)
say "arch-test arm64: ok (binfmt interpreter ${INTERP:-?}, flags ${FLAGS:-?})"
stage_end

# -- the arm64 root ---------------------------------------------------------------------------

MARK=$ROOT/.tilec-arm64-root
stage_start "arm64 root"
if [ "$REBUILD" = 1 ]; then
    say "removing $ROOT (--rebuild-root)"
    remove_root "$ROOT"
fi
if [ -f "$MARK" ]; then
    say "reusing $ROOT ($(cat "$MARK"))"
    stage_end reused
else
    remove_root "$ROOT"
    remove_root "$ROOT.partial"
    say "debootstrap --arch=arm64 --variant=minbase $SUITE -> $ROOT (several minutes; log $WORK/debootstrap.log)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-dev,gcc \
        "$SUITE" "$ROOT.partial" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 30 "$WORK/debootstrap.log"; die "debootstrap failed (log $WORK/debootstrap.log)"; }
    mv "$ROOT.partial" "$ROOT"
    echo "debootstrap $SUITE arm64 minbase, $(date -u +%Y-%m-%dT%H:%MZ)" > "$MARK"
    stage_end built
fi

# without the F flag the kernel looks for the interpreter inside the chroot
if [ -n "$INTERP" ] && [ "${FLAGS#*F}" = "$FLAGS" ] && [ ! -e "$ROOT$INTERP" ]; then
    mkdir -p "$ROOT$(dirname "$INTERP")"
    cp "$(command -v qemu-aarch64-static)" "$ROOT$INTERP"
fi
# name resolution and the host's CA bundle (pip inside the root)
[ -e /etc/resolv.conf ] && cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/etc/ssl/certs"
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"

mount_in_root() {  # mount_in_root TARGET mount-args...
    local target=$ROOT$1
    shift
    if mountpoint -q "$target"; then umount "$target" || umount -l "$target"; fi  # left by a killed run
    mount "$@" "$target"
    MOUNTED+=("$target")
}
mount_in_root /proc -t proc proc
if [ ! -c "$ROOT/dev/null" ] || [ ! -c "$ROOT/dev/urandom" ]; then
    mount_in_root /dev --bind /dev  # debootstrap could not make device nodes (a container)
fi

# Commands in the root: a clean environment, the venv first on PATH, the
# kernels' build cache in /var/cache/tilec-check, one BLAS thread (two
# emulated workers on this machine's cores).
VENV=/opt/tilec-venv
ROOT_ENV=(PATH=$VENV/bin:/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 TMPDIR=/tmp
          TILEC_CACHE=/var/cache/tilec-check OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
          PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
          PIP_NO_INPUT=1)
[ -n "${PIP_INDEX_URL:-}" ] && case $PIP_INDEX_URL in http*) ROOT_ENV+=(PIP_INDEX_URL=$PIP_INDEX_URL) ;; esac
in_root() { chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" "$@"; }

say "in the root: uname -m = $(in_root uname -m), $(in_root python3 -c 'import platform; print("python3", platform.python_version(), "platform.machine() =", platform.machine())'), gcc -dumpmachine = $(in_root gcc -dumpmachine)"
[ "$(in_root python3 -c 'import platform; print(platform.machine())')" = aarch64 ] \
    || die "the root's python3 does not run as aarch64"

# -- the runtime in the root --------------------------------------------------------------------

# The device's share of setup.py's install_requires: numpy, and scipy for
# BLAS (scipy.linalg.cython_blas); wheel builds the project's wheel.
DEPS="numpy>=1.24 scipy>=1.10 wheel"
stage_start "venv + numpy, scipy (arm64 wheels)"
if [ -f "$ROOT$VENV/.tilec-deps" ] && [ "$(cat "$ROOT$VENV/.tilec-deps")" = "$DEPS" ]; then
    stage_end reused
else
    rm -rf --one-file-system "$ROOT$VENV"
    in_root python3 -m venv $VENV
    # shellcheck disable=SC2086
    in_root pip install --only-binary=:all: $DEPS >"$WORK/pip-deps.log" 2>&1 \
        || { tail -n 30 "$WORK/pip-deps.log"; die "pip install $DEPS failed in the root (log $WORK/pip-deps.log)"; }
    echo "$DEPS" > "$ROOT$VENV/.tilec-deps"
    stage_end installed
fi
say "root venv: $(in_root python -c 'import numpy, scipy; print("numpy", numpy.__version__, "scipy", scipy.__version__)')"

stage_start "pip install this checkout (--no-deps)"
SRC=/opt/tilec-src
rm -rf --one-file-system "$ROOT$SRC"
mkdir -p "$ROOT$SRC"
if git -C "$TREE" rev-parse --git-dir >/dev/null 2>&1; then
    # tracked and untracked files, not what .gitignore names (venvs, caches, builds)
    git -C "$TREE" ls-files -z -co --exclude-standard \
        | tar -C "$TREE" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$ROOT$SRC" -xf -
    say "copied $(git -C "$TREE" rev-parse --short HEAD)$(git -C "$TREE" diff --quiet HEAD 2>/dev/null || echo '+changes') of $TREE"
else
    tar -C "$TREE" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' --exclude=build --exclude='*.so' \
        --exclude='.venv*' -cf - . | tar -C "$ROOT$SRC" -xf -
fi
in_root pip install --no-deps --no-build-isolation --force-reinstall $SRC >"$WORK/pip-tilec.log" 2>&1 \
    || { tail -n 30 "$WORK/pip-tilec.log"; die "pip install of the checkout failed in the root (log $WORK/pip-tilec.log)"; }
in_root tilec worker --help >/dev/null || die "\`tilec worker\` does not start in the root"
# informational (an internal function; '?' if it moves): how a device compiles
say "kernel build on the device: $(in_root python -c 'from tilec_runtime.native import find_compiler, build_flags
cc = find_compiler(); print(" ".join(cc + build_flags(cc)))' 2>/dev/null || echo '?')"
stage_end

# -- the cluster key, the workers ------------------------------------------------------------------

mkdir -p "$ROOT/opt/tilec-check"
(umask 077; "$HOST_PY" -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/key")
install -m 600 "$WORK/key" "$ROOT/opt/tilec-check/key"
if [ "$KEEP_KERNELS" = 0 ]; then
    rm -rf --one-file-system "$ROOT/var/cache/tilec-check"  # so that this run builds the kernels on arm64
fi

stage_start "start 2 arm64 workers (tilec worker)"
PORTS=()
for r in 0 1; do
    chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" \
        tilec worker --listen 127.0.0.1:0 --key-file /opt/tilec-check/key --once \
        </dev/null >"$WORK/worker$r.out" 2>"$WORK/worker$r.log" &
    PIDS+=($!)
done
for r in 0 1; do
    deadline=$(( $(date +%s) + STARTUP_TIMEOUT ))
    until grep -q "tilec worker listening on" "$WORK/worker$r.out" 2>/dev/null; do
        kill -0 "${PIDS[r]}" 2>/dev/null || { cat "$WORK/worker$r.log" >&2; die "arm64 worker $r exited before listening"; }
        [ "$(date +%s)" -lt "$deadline" ] || die "arm64 worker $r not listening after $STARTUP_TIMEOUT s"
        sleep 0.5
    done
    line=$(grep -m1 "tilec worker listening on" "$WORK/worker$r.out")
    PORTS+=("${line##*:}")
    # an emulated process: the kernel runs it through the binfmt interpreter
    say "worker $r: pid ${PIDS[r]}, ${line}, /proc/${PIDS[r]}/exe -> $(readlink "/proc/${PIDS[r]}/exe" || echo '?')"
done
# Which kernel module each worker process maps (its kernels are loaded
# after the build, just before the first step): the proof that the
# emulated worker runs the aarch64 module, not just that one was built.
watch_maps() {
    while kill -0 "$1" 2>/dev/null; do
        if grep -q 'tilec_kernels_.*\.so' "/proc/$1/maps" 2>/dev/null; then
            awk '$6 ~ /tilec_kernels_.*\.so$/ { print $6 }' "/proc/$1/maps" | sort -u > "$2"
            return
        fi
        sleep 0.5
    done
}
for r in 0 1; do
    watch_maps "${PIDS[r]}" "$WORK/worker$r.maps" &
    WATCHERS+=($!)
done
cat > "$WORK/cluster.yaml" <<EOF
# two emulated arm64 devices (tools/arm64-check.sh); the profile only shapes the plan
devices:
  - {name: arm64-0, host: 127.0.0.1, port: ${PORTS[0]}, profile: rpi4}
  - {name: arm64-1, host: 127.0.0.1, port: ${PORTS[1]}, profile: rpi4}
link: {bandwidth_mbps: 1000, latency_ms: 0.1}
EOF
stage_end

# -- plan on the host, train on arm64 ------------------------------------------------------------------

cd "$WORK"
stage_start "plan on x86 (tilec compile)"
host_tilec compile "$MODEL" --cluster cluster.yaml --dtype float64 -o plan > compile.log 2>&1 \
    || { cat compile.log; die "tilec compile failed"; }
sed -n '1,/tail on/p' compile.log
stage_end

stage_start "train on the arm64 workers"
say "tilec train $MODEL --plan plan --cluster cluster.yaml --key-file key --steps $STEPS (the workers build the kernels first)"
status=0
timeout --foreground "$TRAIN_TIMEOUT" "$HOST_PY" -m tilec.cli train "$MODEL" --plan plan --cluster cluster.yaml --key-file key \
    --dtype float64 --steps "$STEPS" --timeout 1200 --save-weights arm64.npz --metrics arm64-metrics.jsonl \
    > arm64-train.log 2>&1 || status=$?
sed 's/^/   | /' arm64-train.log
for r in 0 1; do sed 's/^/   | worker '"$r"': /' "worker$r.log"; done
[ "$status" = 0 ] || die "training on the arm64 workers failed (exit $status)"
for r in 0 1; do
    wait "${PIDS[r]}" && st=0 || st=$?
    [ "$st" = 0 ] || die "arm64 worker $r exited with status $st"
done
PIDS=()
for pid in "${WATCHERS[@]}"; do wait "$pid" 2>/dev/null || true; done
WATCHERS=()
stage_end

echo
say "== the kernels the arm64 workers built"
built=0
for so in "$ROOT"/var/cache/tilec-check/build/*/*.so; do
    [ -e "$so" ] || continue
    built=1
    base=$(basename "$so")
    c=$(dirname "$so")/${base%%.*}.c
    secs=$(( $(stat -c %Y "$so") - $(stat -c %Y "$c" 2>/dev/null || stat -c %Y "$so") ))
    say "${so#"$ROOT"}"
    say "   file: $(file -b "$so" | cut -d, -f1-3)"
    if [ "$(stat -c %Y "$so")" -lt "${T0%.*}" ]; then
        say "   built by an earlier run (--keep-kernels), by the root's gcc in about $secs s"
    else
        say "   compiled by the root's gcc in about $secs s (.c written -> .so renamed into place)"
    fi
    file -b "$so" | grep -q "ARM aarch64" || die "$so is not an aarch64 module"
done
[ "$built" = 1 ] || die "no kernel module in the root's build cache: the workers did not build the generated kernels"
for r in 0 1; do
    so=$(head -n1 "$WORK/worker$r.maps" 2>/dev/null || true)
    [ -n "$so" ] || die "worker $r was not seen mapping a tilec_kernels module (/proc/PID/maps)"
    say "worker $r (emulated) has it mapped: $(basename "$so") ($(file -b "$so" | cut -d, -f2 | sed 's/^ //'))"
    file -b "$so" | grep -q "ARM aarch64" || die "worker $r loaded a module that is not aarch64"
done

# -- the same plan on x86 --------------------------------------------------------------------------

stage_start "train the same plan on 2 x86 workers"
host_tilec train "$MODEL" --plan plan --devices 2 --dtype float64 --steps "$STEPS" --save-weights x86.npz \
    --metrics x86-metrics.jsonl > x86-train.log 2>&1 || { cat x86-train.log; die "training on x86 failed"; }
sed 's/^/   | /' x86-train.log
stage_end

# -- compare ---------------------------------------------------------------------------------------

echo
say "== compare"
result=0
"$HOST_PY" "$HERE/arm64_check.py" compare --tol "$TOL" \
    --x86 x86.npz --arm64 arm64.npz \
    --arm64-metrics arm64-metrics.jsonl --x86-metrics x86-metrics.jsonl || result=$?

echo
echo "stage times:"
printf '  %s\n' "${TIMES[@]}"
total=$(elapsed)
total=${total// /}
echo "work directory: $WORK (plan, logs, weights)"
if [ "$result" = 0 ]; then
    echo "arm64-check: PASS in $total s"
else
    echo "arm64-check: FAIL in $total s"
    exit 1
fi
