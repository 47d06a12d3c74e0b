// The CUDA entry points of backend.h, comm.h and cuda_memory.h, forwarded to the CUDA module
// (cuda_module.h), which is loaded on the first request that needs it: commands that never touch
// a GPU never load CUDA. The module's path is the one the build wrote it to; the environment
// variable MOESIM_CUDA_MODULE names another (a moved build tree). Builds without CUDA have no
// module: every request fails with "built without CUDA".
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/cuda_module.h"
#include "executor/error.h"

#include <dlfcn.h>
#include <fmt/format.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace moesim::exec {
namespace {

#ifdef MOESIM_CUDA_MODULE_PATH
constexpr const char* kModulePath = MOESIM_CUDA_MODULE_PATH;
#else
constexpr const char* kModulePath = "";
#endif

struct Loaded {
  const CudaModule* module = nullptr;
  std::string error;  // why there is none
};

std::atomic<const CudaModule*> loaded_module{nullptr};  // set once loaded; read without loading

const Loaded& load() {
  static const Loaded loaded = [] {
    Loaded l;
    if (*kModulePath == '\0') {
      l.error = "moesim was built without CUDA (configure with nvcc available, -DMOESIM_CUDA=ON)";
      return l;
    }
    const char* env = std::getenv("MOESIM_CUDA_MODULE");
    const std::string path = env != nullptr && *env != '\0' ? env : kModulePath;
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      l.error = fmt::format("the CUDA module {} did not load: {} (MOESIM_CUDA_MODULE may name where it is)", path,
                            ::dlerror());
      return l;
    }
    using Entry = const CudaModule* (*)();
    const auto entry = reinterpret_cast<Entry>(::dlsym(handle, "moesim_cuda_module"));
    const CudaModule* m = entry != nullptr ? entry() : nullptr;
    if (m == nullptr || m->version != kCudaModuleVersion) {
      l.error = fmt::format("{} is not the CUDA module of this moesim build ({})", path,
                            m == nullptr ? "no moesim_cuda_module entry"
                                         : fmt::format("version {}, this moesim expects {}", m->version,
                                                       kCudaModuleVersion));
      return l;
    }
    l.module = m;
    loaded_module.store(m);
    return l;
  }();
  return loaded;
}

// `what` names the request in the error; a C string, since it is passed on every tensor copy.
const CudaModule& module(const char* what) {
  const Loaded& l = load();
  if (l.module == nullptr) throw Error(fmt::format("{}: {}", what, l.error));
  return *l.module;
}

}  // namespace

bool built_with_cuda() { return *kModulePath != '\0'; }

int cuda_device_count() {
  if (!built_with_cuda()) return 0;
  const Loaded& l = load();
  if (l.module == nullptr) {
    static const bool warned = [&] {
      std::fprintf(stderr, "moesim: no CUDA: %s\n", l.error.c_str());
      return true;
    }();
    (void)warned;
    return 0;
  }
  return l.module->device_count();
}

bool cuda_available() { return cuda_device_count() > 0; }

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return module("CUDA back end").make_backend(device);
}

#ifdef MOESIM_HAVE_NCCL
bool have_nccl() { return true; }
#else
bool have_nccl() { return false; }
#endif

std::unique_ptr<Comm> make_nccl_comm(double timeout_s) {
  if (!have_nccl()) throw Error("the NCCL engine is not in this build (it needs CUDA and NCCL at configure time)");
  const CudaModule& m = module("the NCCL engine");
  return m.make_nccl_comm(make_mpi_comm(timeout_s), timeout_s);  // make_mpi_comm initialises MPI
}

namespace detail {

std::shared_ptr<void> cuda_alloc(size_t bytes) { return module("CUDA tensor allocation").alloc(bytes); }
void cuda_memset_zero(void* device_ptr, size_t bytes) { module("cudaMemset").memset_zero(device_ptr, bytes); }
void cuda_copy(void* dst, const void* src, size_t bytes, CopyKind kind) {
  module("CUDA tensor copy").copy(dst, src, bytes, kind);
}
void cuda_f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  module("CUDA bf16 conversion").f32_to_bf16(src, dst, n);
}
void cuda_bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  module("CUDA bf16 conversion").bf16_to_f32(src, dst, n);
}
// Without the module loaded nothing was allocated on a GPU.
size_t cuda_peak_allocated_bytes() {
  const CudaModule* m = loaded_module.load();
  return m != nullptr ? m->peak_allocated_bytes() : 0;
}

}  // namespace detail

}  // namespace moesim::exec
