# Included by llama.cpp's CMakeLists right after its project() call, when the Makefile
# builds llama-cpp-python (CMAKE_PROJECT_llama.cpp_INCLUDE in LLAMA_CMAKE_ARGS).
#
# llama-cpp-python 0.3.36 forces LLAMA_BUILD_COMMON=ON in the cache, so llama.cpp also
# compiles libllama-common (chat parsers, jinja, downloads, cpp-httplib): about 40 % of
# the compile, for a library the Python package never loads (it opens only libllama,
# libggml* and, for images, libmtmd). A normal variable shadows the cached one, and
# option() leaves it alone (policy CMP0077), so llama.cpp builds without it, as
# llama-cpp-python's own WebAssembly build does.
set(LLAMA_BUILD_COMMON OFF)
