// The CUDA module's one exported symbol (cuda_module.h): its entry points as a table.
#include "executor/cuda_module.h"

#include "executor/backend.h"
#include "executor/comm.h"

extern "C" __attribute__((visibility("default"))) const moesim::exec::CudaModule* moesim_cuda_module() {
  namespace cuda = moesim::exec::cuda;
  static const moesim::exec::CudaModule table = [] {
    moesim::exec::CudaModule t;
    t.version = moesim::exec::kCudaModuleVersion;
    t.device_count = cuda::device_count;
    t.make_backend = cuda::make_backend;
    t.alloc = cuda::alloc;
    t.memset_zero = cuda::memset_zero;
    t.peak_allocated_bytes = cuda::peak_allocated_bytes;
    t.copy = cuda::copy;
    t.f32_to_bf16 = cuda::f32_to_bf16;
    t.bf16_to_f32 = cuda::bf16_to_f32;
#ifdef MOESIM_HAVE_NCCL
    t.make_nccl_comm = cuda::make_nccl_comm;
#endif
    return t;
  }();
  return &table;
}
