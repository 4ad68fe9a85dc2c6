#!/usr/bin/env bash
# The device check of a CUDA build of the engine (issue 13; README "GPU builds"). No network.
#
#   benchmarks/gpu_check.sh [--dry-run] (--engine-lib PATH/libllama.so | --sdist PATH.tar.gz)
#                           [--build-only] [--out DIR] [-- options of gpu_check.py]
#
# --engine-lib  an existing CUDA build's libllama.so (its llama-quantize: QUANTBENCH_LLAMA_QUANTIZE
#               or on PATH, or the wheel's bin/ beside it)
# --sdist       the ik-llama-cpp-python sdist: built here with nvcc into DIR/cuda-venv
#               (CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native}"; its
#               build requirements must be installed already: nothing is downloaded)
# --build-only  build (sdist) and stop: a first command of at most 10 minutes, the check second
# --dry-run     print what would be built and run; load and run nothing
# Then benchmarks/gpu_check.py runs steps (a)-(d) on the GPU and prints one table.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
dry=0; build_only=0; lib=""; sdist=""; out="$repo/gpu-check"; rest=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --build-only) build_only=1 ;;
        --engine-lib) lib="$2"; shift ;;
        --engine-lib=*) lib="${1#*=}" ;;
        --sdist) sdist="$2"; shift ;;
        --sdist=*) sdist="${1#*=}" ;;
        --out) out="$2"; shift ;;
        --out=*) out="${1#*=}" ;;
        --) shift; rest=("$@"); break ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "gpu_check: $*"; }
python="${PYTHON:-python3}"
venv="$out/cuda-venv"

if [ -z "$lib" ] && [ -z "$sdist" ] && [ -x "$venv/bin/python" ]; then
    python="$venv/bin/python"  # built by an earlier --build-only call
elif [ -z "$lib" ] && [ -z "$sdist" ]; then
    echo "gpu_check.sh: no CUDA engine: give --engine-lib PATH/libllama.so of a CUDA build, or" \
         "--sdist PATH to the ik-llama-cpp-python sdist to build one with nvcc" >&2
    exit 2
fi
if [ -n "$lib" ]; then
    if [ "$dry" = 0 ] && [ ! -f "$lib" ]; then echo "gpu_check.sh: --engine-lib $lib does not exist" >&2; exit 2; fi
    export IK_LLAMA_CPP_LIB_PATH="$lib"
    say "engine library $lib"
elif [ -n "$sdist" ]; then
    cmake_args="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native}"
    build=("$python" -m venv --system-site-packages "$venv" "&&" "$venv/bin/python" -m pip install
           --no-index --no-deps --no-build-isolation "$sdist")
    if [ "$dry" = 1 ]; then
        say "would build: CMAKE_ARGS=\"$cmake_args\" ${build[*]}"
    else
        command -v nvcc >/dev/null || { echo "gpu_check.sh: --sdist needs nvcc on PATH" >&2; exit 2; }
        [ -f "$sdist" ] || { echo "gpu_check.sh: --sdist $sdist does not exist" >&2; exit 2; }
        "$python" -m venv --system-site-packages "$venv"
        CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "$venv/bin/python" -m pip install --no-index --no-deps --no-build-isolation "$sdist"
    fi
    python="$venv/bin/python"
fi
[ "$build_only" = 1 ] && { say "built into $venv; run again without --build-only"; exit 0; }

if [ "$dry" = 1 ]; then
    say "would run: nvidia-smi -L (the GPUs this machine has)"
    PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" "$here/gpu_check.py" \
        --dry-run --out "$out" ${rest[@]+"${rest[@]}"}
    exit 0
fi
nvidia-smi -L || say "nvidia-smi not found"
mkdir -p "$out"
PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" timeout 600 "$python" "$here/gpu_check.py" \
    --out "$out" ${rest[@]+"${rest[@]}"}
