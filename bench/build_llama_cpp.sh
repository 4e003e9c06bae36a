#!/usr/bin/env bash
# Build llama.cpp's llama-cli, llama-bench, llama-perplexity, llama-server, llama-quantize and
# llama-speculative, the peer the bench scripts (engine.py, compress.py, quant_speed.py,
# models.py, serve.py, hybrid.py) run side by side with ours.
#
#     bash bench/build_llama_cpp.sh          # ~10-15 min per build on 2 cores; needs cmake, gcc/g++, pip
#     JOBS=1 nice -n 19 bash bench/build_llama_cpp.sh   # beside a running benchmark
#
# There is no internet here, only PyPI, so the sources come from the sdist of
# llama-cpp-python, which vendors llama.cpp (pin LLAMA_CPP_PYTHON to change the version).
# CPU only, no curl. Nothing of it is part of pocketlm; .peer/ is git-ignored.
#
# Builds:
#   .peer/build/bin         native flags (GGML_NATIVE=ON: whatever this CPU has, AVX2/FMA, or
#                           AVX-512 and VNNI, and AMX on Sapphire Rapids), as a user would build it.
#   .peer/build-avx512/bin  only where the CPU has AMX (amx_tile in /proc/cpuinfo): AVX-512 with
#                           VNNI/BF16/VBMI but no AMX. The native AMX build decodes fastest but
#                           segfaults in every batched pass (llama-bench -p, llama-perplexity) on
#                           Sapphire Rapids, so the bench scripts take prefill and perplexity from
#                           this one (bench/_common.py: llama_bin(name, batched=True)).
# On a CPU without AMX the native build serves everything and no second build is made.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${LLAMA_CPP_PYTHON:-0.3.36}"
pip="${PIP:-.venv/bin/pip}"
targets=(llama-cli llama-bench llama-perplexity llama-server llama-quantize llama-speculative)
mkdir -p .peer
if [ ! -d ".peer/src/vendor/llama.cpp" ]; then
    "$pip" download --no-deps --no-binary :all: --dest .peer "llama-cpp-python==${version}"
    rm -rf .peer/src && mkdir -p .peer/src
    tar xzf ".peer/llama_cpp_python-${version}.tar.gz" -C .peer/src --strip-components 1
fi

build() {  # build DIR CMAKE_FLAGS...
    local dir="$1"; shift
    cmake -S .peer/src/vendor/llama.cpp -B "$dir" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
        -DBUILD_SHARED_LIBS=OFF "$@" > "$dir.cmake.log" 2>&1
    cmake --build "$dir" -j "${JOBS:-$(nproc)}" --target "${targets[@]}" > "$dir.build.log" 2>&1
    for t in "${targets[@]}"; do ls -1 "$dir/bin/$t"; done
}

mkdir -p .peer/build
build .peer/build -DGGML_NATIVE=ON
if grep -qw amx_tile /proc/cpuinfo; then
    mkdir -p .peer/build-avx512
    build .peer/build-avx512 -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AVX512_VBMI=ON -DGGML_AVX_VNNI=ON
else
    echo "no AMX on this CPU: the native build in .peer/build serves decode, prefill and perplexity"
fi
