// Kernel math is written once, as functions both the CPU reference and CUDA kernels call
// (../shared/CONVENTIONS.md: the tested code is the shipped code).
#pragma once

#if defined(__CUDACC__)
#define MOESIM_HOST_DEVICE __host__ __device__
#else
#define MOESIM_HOST_DEVICE
#endif
