# An optimized BLAS for the CPU kernels: Accelerate on macOS, scipy-openblas32 on Linux.
# Never MLX's own CPU GEMM path (netlib reference BLAS in the Linux wheel, ~5 GFLOP/s).
add_library(mlx_tuner_blas INTERFACE)
if(APPLE)
  find_library(ACCELERATE_FRAMEWORK Accelerate REQUIRED)
  target_link_libraries(mlx_tuner_blas INTERFACE ${ACCELERATE_FRAMEWORK})
  target_compile_definitions(mlx_tuner_blas INTERFACE MLX_TUNER_ACCELERATE ACCELERATE_NEW_LAPACK)
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import scipy_openblas32 as o; print(o.get_include_dir()); print(o.get_lib_dir()); print(o.get_library(True))"
    OUTPUT_VARIABLE _ob OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _ob_rc)
  if(NOT _ob_rc EQUAL 0)
    message(FATAL_ERROR "scipy-openblas32 is not importable: pip install scipy-openblas32")
  endif()
  string(REPLACE "\n" ";" _ob "${_ob}")
  list(GET _ob 0 _ob_inc)
  list(GET _ob 1 _ob_lib)
  list(GET _ob 2 _ob_name)
  target_include_directories(mlx_tuner_blas INTERFACE "${_ob_inc}")
  target_link_libraries(mlx_tuner_blas INTERFACE "${_ob_lib}/${_ob_name}")
  target_compile_definitions(mlx_tuner_blas INTERFACE MLX_TUNER_SCIPY_OPENBLAS)
  message(STATUS "mlx-tuner: BLAS = ${_ob_lib}/${_ob_name}")
endif()
