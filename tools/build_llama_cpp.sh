#!/usr/bin/env bash
# Build and install llama-cpp-python 0.3.36 from source with one fix applied to its vendored
# llama.cpp: the llava CLIP graph puts the [CLS] token after the patches while its inputs assume
# it comes first (ggml-org/llama.cpp#25814, fix proposed in #25844). Unfixed, every llava image is
# encoded with shifted position embeddings, patch 0 dropped and [CLS] passed to the LLM.
# A second fix: the pixtral graph (tools/mtmd/models/pixtral.cpp) builds its [IMG_BREAK] column by
# scaling a never-written tensor by 0 and adding the embedding; 0 x NaN is NaN, so when the reused
# compute buffer holds a NaN bit pattern every picture of that load encodes to NaN (seen in about 1
# load of 8 with a 640 px tower). It is built by repeating the embedding instead.
#
# The installed version is 0.3.36+acestep.3 (it satisfies ==0.3.36). Pass CMAKE_ARGS for CUDA:
#   CMAKE_ARGS="-DGGML_CUDA=on" bash tools/build_llama_cpp.sh
#
# ggml's AMX kernels are left out (-mno-amx-*): on Xeons with AMX (Sapphire Rapids and later, the
# machines CI runs on included) the native build of 0.3.36 takes the AMX path for Q8_0/K-quant weights
# and segfaults in ggml_backend_amx_mul_mat on the first llama_decode. ACESTEP_GGUF_AMX=1 keeps them.
# (.1 was the same build with AMX; it is rebuilt.)
#
# It also keeps llama.cpp's Qwen2 and Llama (SentencePiece) tokenizer test vectors
# (models/ggml-vocab-{qwen2,llama-spm}.gguf + .inp/.out) and llama.cpp's own checkpoint converter
# (convert_hf_to_gguf.py with its conversion/ and gguf-py/, for the `import` test: a pair made elsewhere)
# in $ACESTEP_GGUF_TEST_DATA (default ~/.cache/acestep-gguf/test-data): the test suite reads them
# there and never downloads anything itself.
set -euo pipefail
VERSION=0.3.36
PY=${PYTHON:-python3}
DATA="${ACESTEP_GGUF_TEST_DATA:-$HOME/.cache/acestep-gguf/test-data}/llama-cpp-python-$VERSION"
VOCABS="ggml-vocab-qwen2.gguf ggml-vocab-llama-spm.gguf"
TAG=acestep.3
installed() { "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$VERSION+$TAG' else 1)" 2>/dev/null; }
have_data() {
  for v in $VOCABS; do for s in "" .inp .out; do [ -f "$DATA/$v$s" ] || return 1; done; done
  [ -f "$DATA/llama.cpp-convert/convert_hf_to_gguf.py" ] && [ -x "$DATA/bin/llama-imatrix" ] && [ -x "$DATA/bin/llama-quantize" ]
}
if installed && [ -z "${FORCE:-}" ] && have_data; then
  echo "llama-cpp-python $VERSION+$TAG is already installed (FORCE=1 rebuilds it)"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation "llama-cpp-python==$VERSION" -d "$work" -q 2>/dev/null \
  || "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work" -q
tar -xzf "$work"/llama_cpp_python-$VERSION.tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION"
mkdir -p "$DATA"
for v in $VOCABS; do for suffix in "" .inp .out; do cp "$src/vendor/llama.cpp/models/$v$suffix" "$DATA/"; done; done
rm -rf "$DATA/llama.cpp-convert" && mkdir -p "$DATA/llama.cpp-convert"
cp -r "$src/vendor/llama.cpp/convert_hf_to_gguf.py" "$src/vendor/llama.cpp/conversion" "$src/vendor/llama.cpp/gguf-py" \
  "$DATA/llama.cpp-convert/"
# llama.cpp's own llama-imatrix and llama-quantize, the references of the imatrix tests (about 10
# minutes on 2 cores, once): the same vendored source, static, without AMX as below
if [ ! -x "$DATA/bin/llama-imatrix" ] || [ ! -x "$DATA/bin/llama-quantize" ]; then
  echo "building llama.cpp's llama-imatrix and llama-quantize for the tests (about 10 minutes on 2 cores)"
  command -v cmake >/dev/null && command -v ninja >/dev/null || "$PY" -m pip install -q cmake ninja
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$src/vendor/llama.cpp" -B "$work/tools" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" > "$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; exit 1; }
  ninja -C "$work/tools" llama-imatrix llama-quantize > "$work/ninja.log" 2>&1 || { tail -50 "$work/ninja.log" >&2; exit 1; }
  mkdir -p "$DATA/bin" && cp "$work/tools/bin/llama-imatrix" "$work/tools/bin/llama-quantize" "$DATA/bin/"
fi
if installed && [ -z "${FORCE:-}" ]; then
  echo "llama-cpp-python $VERSION+$TAG is already installed; tokenizer test data kept in $DATA"
  exit 0
fi
graph="$src/vendor/llama.cpp/tools/mtmd/models/llava.cpp"
grep -q 'ggml_concat(ctx0, inp, model.class_embedding, 1)' "$graph" || { echo "llava.cpp has changed: patch no longer applies" >&2; exit 1; }
sed -i 's/ggml_concat(ctx0, inp, model.class_embedding, 1)/ggml_concat(ctx0, model.class_embedding, inp, 1)/' "$graph"
"$PY" - "$src/vendor/llama.cpp/tools/mtmd/models/pixtral.cpp" <<'PATCH' || { echo "pixtral.cpp has changed: patch no longer applies" >&2; exit 1; }
import sys
path = sys.argv[1]
text = open(path).read()
old = """        ggml_tensor * tok = ggml_new_tensor_3d(ctx0, tmp->type, n_embd_text, 1, p_y);
        tok = ggml_scale(ctx0, tok, 0.0); // clear the tensor
        tok = ggml_add(ctx0, tok, model.token_embd_img_break);
"""
new = """        ggml_tensor * tok = ggml_repeat_4d(ctx0, ggml_cast(ctx0, model.token_embd_img_break, tmp->type),
                                           n_embd_text, 1, p_y, 1); // acestep: no uninitialized read
"""
if old not in text:
    sys.exit(1)
open(path, "w").write(text.replace(old, new))
PATCH
sed -i "s/^__version__ = \"$VERSION\"/__version__ = \"$VERSION+$TAG\"/" "$src/llama_cpp/__init__.py"
echo "building llama-cpp-python $VERSION+$TAG (about 5 minutes on 2 cores)"
if [ -z "${ACESTEP_GGUF_AMX:-}" ]; then
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'"
fi
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$PY" -m pip install -q "$src"
"$PY" -c "import llama_cpp; print('installed llama-cpp-python', llama_cpp.__version__)"
