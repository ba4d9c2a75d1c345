# cuBLASLt for the CUDA kernels (CUDA flavour only): the CUDA toolkit's when it has one,
# else the nvidia-cublas wheel (CUDA 13) that mlx-cuda itself depends on. libmlx already
# loads libcublasLt.so.13, so linking that soname adds no second copy at run time.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))"
  OUTPUT_VARIABLE _nv_cu13 OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
find_path(MLX_TUNER_CUBLASLT_INCLUDE cublasLt.h
  HINTS ${CUDAToolkit_INCLUDE_DIRS} "${_nv_cu13}/include")
find_library(MLX_TUNER_CUBLASLT_LIBRARY NAMES cublasLt libcublasLt.so.13
  HINTS ${CUDAToolkit_LIBRARY_DIR} "${_nv_cu13}/lib")
if(NOT MLX_TUNER_CUBLASLT_INCLUDE OR NOT MLX_TUNER_CUBLASLT_LIBRARY)
  message(FATAL_ERROR "cuBLASLt not found: pip install 'nvidia-cublas==13.*' (or a CUDA toolkit with cuBLAS)")
endif()
add_library(mlx_tuner_cublaslt INTERFACE)
target_include_directories(mlx_tuner_cublaslt INTERFACE "${MLX_TUNER_CUBLASLT_INCLUDE}")
target_link_libraries(mlx_tuner_cublaslt INTERFACE "${MLX_TUNER_CUBLASLT_LIBRARY}")
message(STATUS "mlx-tuner: cuBLASLt = ${MLX_TUNER_CUBLASLT_LIBRARY}")
