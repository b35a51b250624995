#!/usr/bin/env bash
# Builds build/chat_prompt: llama.cpp's own chat-prompt code (common/chat.cpp and its Jinja engine, as llama-server
# and llama-cli run it) from the source of the installed llama-cpp-python's version, linked to the libllama it
# installed. The tests use it to check that llama.cpp renders and tokenizes each exported GGUF's chat template as
# training did. Needs g++ and the active environment's llama-cpp-python; about a minute on 2 cores.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/build"
version=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
lib=$(python -c "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))")
source_dir="$out/llama_cpp_python-$version/vendor/llama.cpp"
mkdir -p "$out/obj"
if [ ! -d "$source_dir/common" ]; then
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$out"
    tar xzf "$out/llama_cpp_python-$version.tar.gz" -C "$out" --wildcards \
        "llama_cpp_python-$version/vendor/llama.cpp/common/*" "llama_cpp_python-$version/vendor/llama.cpp/vendor/*" \
        "llama_cpp_python-$version/vendor/llama.cpp/include/*" "llama_cpp_python-$version/vendor/llama.cpp/ggml/include/*" \
        "llama_cpp_python-$version/vendor/llama.cpp/src/*.h"
    rm "$out/llama_cpp_python-$version.tar.gz"
fi
cd "$source_dir"
flags=(-std=c++17 -O0 -I common -I vendor -I include -I ggml/include)
# common/ without what needs the network or a command line (downloads, argument parsing, the console)
sed 's/@LLAMA_BUILD_NUMBER@/0/; s/@[A-Z_]*@/unknown/' common/build-info.cpp.in > "$out/obj/build-info.cpp"
ls common/*.cpp common/jinja/*.cpp common/parsers/*.cpp "$out/obj/build-info.cpp" \
    | grep -v -E '/(arg|download|hf-cache|llguidance|preset|console)\.cpp$' \
    | xargs -P "$(nproc)" -I{} sh -c 'g++ '"${flags[*]}"' -c "{}" -o "'"$out"'/obj/$(echo "{}" | tr / _).o"'
g++ "${flags[@]}" "$here/chat_prompt.cpp" "$out"/obj/*.o -L"$lib" -lllama -lggml -lggml-base -Wl,-rpath,"$lib" \
    -o "$out/chat_prompt"
echo "built $out/chat_prompt (llama.cpp of llama-cpp-python $version)"
