// The CUDA build path: one kernel against its CPU reference, both calling the same
// MOESIM_HOST_DEVICE math. Without a usable device the CPU half still runs and the test reports
// itself skipped (exit 77, shown by CTest as "Skipped") with the reason on stdout.
#include "common/host_device.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

MOESIM_HOST_DEVICE float axpy(float a, float x, float y) { return a * x + y; }

__global__ void axpy_kernel(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = axpy(a, x[i], y[i]);
}

constexpr int kSkipped = 77;

}  // namespace

int main() {
  const int n = 1000;
  std::vector<float> x(n), y(n), ref(n);
  for (int i = 0; i < n; ++i) {
    x[i] = static_cast<float>(i % 17);  // small integers: exact in fp32
    y[i] = static_cast<float>(i % 5);
    ref[i] = axpy(3.0f, x[i], y[i]);
    if (ref[i] != 3.0f * (i % 17) + (i % 5)) {
      std::printf("FAILED: CPU reference wrong at %d\n", i);
      return 1;
    }
  }
  int devices = 0;
  cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no usable CUDA device (%s); CPU reference checked\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return kSkipped;
  }
  float *dx = nullptr, *dy = nullptr;
  if (cudaMalloc(&dx, n * sizeof(float)) != cudaSuccess || cudaMalloc(&dy, n * sizeof(float)) != cudaSuccess) {
    std::printf("FAILED: cudaMalloc\n");
    return 1;
  }
  cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpy(dy, y.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  axpy_kernel<<<(n + 255) / 256, 256>>>(3.0f, dx, dy, n);
  err = cudaDeviceSynchronize();
  cudaMemcpy(y.data(), dy, n * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(dx);
  cudaFree(dy);
  if (err != cudaSuccess) {
    std::printf("FAILED: kernel: %s\n", cudaGetErrorString(err));
    return 1;
  }
  for (int i = 0; i < n; ++i)
    if (y[i] != ref[i]) {
      std::printf("FAILED: device %g vs reference %g at %d\n", y[i], ref[i], i);
      return 1;
    }
  std::printf("PASSED: %d elements match the CPU reference on %d device(s)\n", n, devices);
  return 0;
}
