#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-perplexity and llama-quantize into .peer/build/bin, the
# peer the bench scripts (engine.py, compress.py, quant_speed.py) run side by side with ours.
#
#     bash bench/build_llama_cpp.sh          # ~10 min on 2 cores; needs cmake, gcc/g++, pip
#     JOBS=1 nice -n 19 bash bench/build_llama_cpp.sh   # beside a running benchmark
#
# There is no internet here, only PyPI, so the sources come from the sdist of
# llama-cpp-python, which vendors llama.cpp (pin LLAMA_CPP_PYTHON to change the version).
# CPU only, native flags (whatever this CPU has: AVX2/FMA, or AVX-512 and VNNI on newer ones,
# as a user building llama.cpp would), no curl, no server. Nothing of it is part of pocketlm; .peer/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${LLAMA_CPP_PYTHON:-0.3.36}"
pip="${PIP:-.venv/bin/pip}"
mkdir -p .peer
if [ ! -d ".peer/src/vendor/llama.cpp" ]; then
    "$pip" download --no-deps --no-binary :all: --dest .peer "llama-cpp-python==${version}"
    rm -rf .peer/src && mkdir -p .peer/src
    tar xzf ".peer/llama_cpp_python-${version}.tar.gz" -C .peer/src --strip-components 1
fi
cmake -S .peer/src/vendor/llama.cpp -B .peer/build -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DBUILD_SHARED_LIBS=OFF > .peer/cmake.log 2>&1
cmake --build .peer/build -j "${JOBS:-$(nproc)}" --target llama-bench llama-perplexity llama-quantize \
    > .peer/build.log 2>&1
ls -1 .peer/build/bin/llama-bench .peer/build/bin/llama-perplexity .peer/build/bin/llama-quantize
