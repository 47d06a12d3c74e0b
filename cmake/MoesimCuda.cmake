# CUDA is optional: with MOESIM_CUDA=AUTO the language is enabled only when nvcc is found
# (on PATH, via CUDACXX, or at /usr/local/cuda/bin/nvcc), so machines without CUDA still build.
set(MOESIM_HAVE_CUDA OFF)
if(NOT MOESIM_CUDA STREQUAL "OFF")
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_STANDARD 17)  # CMake 3.25 has no C++20 flags for nvcc; kernels need only 17
    # The GPUs of the bundled clusters: A100 (sm_80) and H100/H800 (sm_90, with PTX for newer ones).
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES "80-real;90")
    endif()
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(MOESIM_HAVE_CUDA ON)
  elseif(MOESIM_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOESIM_CUDA=ON but no working nvcc was found")
  endif()
endif()
message(STATUS "moesim: CUDA back end ${MOESIM_HAVE_CUDA}")
