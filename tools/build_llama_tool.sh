#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (the references benchmarks compare with) from the vendored
# tree of llama-cpp-python 0.3.36's source distribution, without AMX like the library itself (see
# build_llama_cpp.sh), into $ACESTEP_GGUF_TEST_DATA/llama-cpp-python-0.3.36/bin. The tests need only
# llama-imatrix and llama-quantize, which build_llama_cpp.sh makes; this is for the others:
#   bash tools/build_llama_tool.sh llama-batched-bench      # about 10 minutes on 2 cores
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 TARGET..." >&2; exit 2; }
VERSION=0.3.36
PY=${PYTHON:-python3}
BIN="${ACESTEP_GGUF_TEST_DATA:-$HOME/.cache/acestep-gguf/test-data}/llama-cpp-python-$VERSION/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" -q
tar -xzf "$work"/llama_cpp_python-$VERSION.tar.gz -C "$work"
command -v cmake >/dev/null && command -v ninja >/dev/null || "$PY" -m pip install -q cmake ninja
noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$work/b" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" > "$work/cmake.log" 2>&1 \
  || { cat "$work/cmake.log" >&2; exit 1; }
ninja -C "$work/b" "$@" > "$work/ninja.log" 2>&1 || { tail -50 "$work/ninja.log" >&2; exit 1; }
mkdir -p "$BIN"
for t in "$@"; do cp "$work/b/bin/$t" "$BIN/"; echo "built $BIN/$t"; done
