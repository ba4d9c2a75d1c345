# The CUDA flavour of MLXConfig.cmake runs find_dependency(CUDNN) although an extension
# never links cuDNN. Point it at the nvidia-cudnn wheel when one is importable, or at
# empty stubs (MLX_TUNER_CUDNN_STUB=ON, the default), so a compile-only build works.
option(MLX_TUNER_CUDNN_STUB "Satisfy MLXConfig's cuDNN check with stubs" ON)
if(NOT CUDNN_INCLUDE_PATH)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import nvidia.cudnn as m; print(list(m.__path__)[0])"
    OUTPUT_STRIP_TRAILING_WHITESPACE OUTPUT_VARIABLE _cudnn_root
    RESULT_VARIABLE _cudnn_rc ERROR_QUIET)
  if(_cudnn_rc EQUAL 0 AND EXISTS "${_cudnn_root}/include/cudnn.h")
    set(CUDNN_INCLUDE_PATH "${_cudnn_root}/include")
    set(CUDNN_LIBRARY_PATH "${_cudnn_root}/lib")
  elseif(MLX_TUNER_CUDNN_STUB)
    set(_stub "${CMAKE_BINARY_DIR}/cudnn_stub")
    file(WRITE "${_stub}/include/cudnn.h" "#error cuDNN stub: mlx-tuner never includes cuDNN\n")
    file(WRITE "${_stub}/include/cudnn_version.h" "#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 0\n#define CUDNN_PATCHLEVEL 0\n")
    foreach(_l cudnn cudnn_graph cudnn_engines_runtime_compiled)
      file(WRITE "${_stub}/lib/lib${_l}.so" "")
    endforeach()
    set(CUDNN_INCLUDE_PATH "${_stub}/include")
    set(CUDNN_LIBRARY_PATH "${_stub}/lib")
  endif()
endif()
