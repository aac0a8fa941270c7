#!/usr/bin/env bash
# One GPU check, run from the repository root on the GPU machine (no internet there):
#   env -> install -> pytest -m gpu tests/test_gpu.py -> benchmarks.bench_gpu
# Everything lands in $OUT (default /tmp/gpuout): env.txt, install.log, gpu_tests.log,
# bench_gpu.log, bench_gpu.json, status.txt.  Each stage runs even if an earlier one failed;
# the exit status is nonzero if any stage failed.  Without CUDA the tests skip and the benchmark
# runs a CPU smoke (--device cpu --sizes 0.01), so the script can be tried on any machine.
# Time: under 6 minutes (tests <= TEST_TIMEOUT s, benchmark <= BENCH_TIMEOUT s).
set -u

OUT=${OUT:-/tmp/gpuout}
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! python3 -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python # trying it on a dev machine whose python3 has no torch
fi
SITE=${SITE:-/tmp/site}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
BENCH_BUDGET=${BENCH_BUDGET:-165}
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
declare -A RC=()
T0=$SECONDS

stage() { echo "=== [$((SECONDS - T0))s] $*" | tee -a "$OUT/status.txt"; }

# ---------------------------------------------------------------- env
stage env
{
    date -u
    echo "host: $(hostname)"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" - <<'EOF' 2>&1
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    print("nccl", torch.cuda.nccl.version())
for mod in ("numpy", "safetensors", "fsspec", "pytest", "pytest_timeout", "hypothesis"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError:
        print(mod, "MISSING")
EOF
    echo "cpus: $(nproc)"
    free -g 2>&1 || true
    df -h /tmp /dev/shm 2>&1 || true
} >"$OUT/env.txt" 2>&1
RC[env]=$?
cat "$OUT/env.txt"

# ---------------------------------------------------------------- install
stage install
(
    rc=0
    # the package itself (no deps, no network): checks that it builds and installs; built from
    # a copy, so setuptools leaves no build/ in the checkout (a stale one leaks into later wheels)
    src=$(mktemp -d)
    cp -r pyproject.toml README.md asyncckpt "$src"/
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target "$SITE" --upgrade "$src" || rc=1
    rm -rf "$src"
    # test tools carried as wheels in .whl/: install each one only if it is not importable
    if [ -d .whl ]; then
        for whl in .whl/*.whl; do
            [ -e "$whl" ] || continue
            mod=$(basename "$whl" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
            if "$PY" -c "import $mod" 2>/dev/null; then
                echo "have $mod; not installing $whl"
            else
                # a pure-python wheel is a zip that works unpacked on sys.path: the fallback if pip fails
                "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$whl" ||
                    "$PY" -m zipfile -e "$whl" "$SITE" || rc=1
            fi
        done
    fi
    "$PY" -c "import asyncckpt, pytest; print('asyncckpt from', asyncckpt.__file__, '; pytest', pytest.__version__)" || rc=1
    exit $rc
) >"$OUT/install.log" 2>&1
RC[install]=$?
tail -n 20 "$OUT/install.log"

# ---------------------------------------------------------------- tests
stage tests
TEST_ARGS=(-q -p no:cacheprovider -o addopts= -ra -m gpu)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    TEST_ARGS+=(--timeout 90)
fi
timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest "${TEST_ARGS[@]}" tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
RC[tests]=${PIPESTATUS[0]}

# ---------------------------------------------------------------- benchmark
stage bench
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    BENCH_ARGS=(--sizes "${BENCH_SIZES:-1,4,16}" --budget-s "$BENCH_BUDGET")
    # checkpoints go to tmpfs when it is large enough (the stall does not depend on the
    # storage, and the budget then covers more); BENCH_DIR overrides
    shm_free=$(df -k --output=avail /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')
    if [ -z "${BENCH_DIR:-}" ] && [ "${shm_free:-0}" -gt $((40 * 1024 * 1024)) ]; then
        BENCH_DIR=/dev/shm
    fi
else
    echo "no CUDA: a CPU smoke run of the benchmark"
    BENCH_ARGS=(--device cpu --sizes 0.01 --budget-s "$BENCH_BUDGET")
fi
BENCH_ARGS+=(--dir "${BENCH_DIR:-/tmp}" --json "$OUT/bench_gpu.json")
echo "python -m benchmarks.bench_gpu ${BENCH_ARGS[*]}"
timeout -k 10 "$BENCH_TIMEOUT" "$PY" -m benchmarks.bench_gpu "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench_gpu.log"
RC[bench]=${PIPESTATUS[0]}

# ---------------------------------------------------------------- summary
status=0
for s in env install tests bench; do
    echo "$s: exit ${RC[$s]}" | tee -a "$OUT/status.txt"
    [ "${RC[$s]}" -eq 0 ] || status=1
done
stage "done, exit $status"
exit $status
