// Registered device types: vendor datasheet peaks (dense, no sparsity). What a device really
// achieves belongs in calibrated device profiles, not here. Memory in decimal bytes (80 GB = 80e9).
// Kernel launch overhead is not a datasheet figure: 4 us is a typical CUDA/HIP launch cost to be
// replaced by calibration (`moesim calibrate`).
#include "topologies/registry.h"

#include <fmt/format.h>
#include <google/protobuf/text_format.h>

namespace moesim::topo {
namespace {

struct Preset {
  const char* name;
  const char* description;
  const char* textproto;
};

constexpr Preset kPresets[] = {
    // NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16/FP16 989.4 TFLOP/s dense, FP8 1978.9,
    // TF32 494.7, FP32 66.9; 80 GB HBM3 at 3.35 TB/s.
    {"h100-sxm5", "NVIDIA H100 SXM5 80 GB (Hopper), 989 TFLOP/s BF16 dense, 3.35 TB/s HBM3",
     R"pb(name: "H100-SXM5"
          peak_flops_per_s { fp32: 66.9e12 tf32: 494.7e12 bf16: 989.4e12 fp16: 989.4e12 fp8: 1978.9e12 }
          memory_bytes: 80e9 memory_bandwidth_Bps: 3.35e12 kernel_launch_overhead_s: 4e-6)pb"},
    // H800 SXM5: the export variant of H100 with the same compute and HBM, less NVLink (the
    // node's scale-up bandwidth says so, not the device).
    {"h800-sxm5", "NVIDIA H800 SXM5 80 GB: H100 compute and memory, NVLink cut to 400 GB/s (set in the node)",
     R"pb(name: "H800-SXM5"
          peak_flops_per_s { fp32: 66.9e12 tf32: 494.7e12 bf16: 989.4e12 fp16: 989.4e12 fp8: 1978.9e12 }
          memory_bytes: 80e9 memory_bandwidth_Bps: 3.35e12 kernel_launch_overhead_s: 4e-6)pb"},
    // NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312 TFLOP/s dense, TF32 156, FP32 19.5;
    // 80 GB HBM2e at 2,039 GB/s (SXM4 80GB), 40 GB HBM2 at 1,555 GB/s (40GB). No FP8.
    {"a100-sxm4-80gb", "NVIDIA A100 SXM4 80 GB (Ampere), 312 TFLOP/s BF16 dense, 2.04 TB/s HBM2e",
     R"pb(name: "A100-SXM4-80GB"
          peak_flops_per_s { fp32: 19.5e12 tf32: 156e12 bf16: 312e12 fp16: 312e12 }
          memory_bytes: 80e9 memory_bandwidth_Bps: 2.039e12 kernel_launch_overhead_s: 4e-6)pb"},
    {"a100-sxm4-40gb", "NVIDIA A100 SXM4 40 GB (Ampere), 312 TFLOP/s BF16 dense, 1.56 TB/s HBM2",
     R"pb(name: "A100-SXM4-40GB"
          peak_flops_per_s { fp32: 19.5e12 tf32: 156e12 bf16: 312e12 fp16: 312e12 }
          memory_bytes: 40e9 memory_bandwidth_Bps: 1.555e12 kernel_launch_overhead_s: 4e-6)pb"},
    // AMD Instinct MI300X data sheet: FP16/BF16 1307.4 TFLOP/s dense, FP8 2614.9, TF32 653.7,
    // FP32 163.4; 192 GB HBM3 at 5.3 TB/s.
    {"mi300x", "AMD Instinct MI300X 192 GB (CDNA 3), 1307 TFLOP/s BF16 dense, 5.3 TB/s HBM3",
     R"pb(name: "MI300X"
          peak_flops_per_s { fp32: 163.4e12 tf32: 653.7e12 bf16: 1307.4e12 fp16: 1307.4e12 fp8: 2614.9e12 }
          memory_bytes: 192e9 memory_bandwidth_Bps: 5.3e12 kernel_launch_overhead_s: 4e-6)pb"},
};

}  // namespace

void resolve_device_preset(hw::DeviceType* d, const ConfigScope& scope) {
  if (!d->has_preset()) return;
  const hw::DeviceType* preset = device_presets().find(d->preset());
  if (preset == nullptr) {
    scope.error("preset", fmt::format("unknown device type '{}'; registered: {}", d->preset(), device_presets().names()));
    return;
  }
  hw::DeviceType merged = *preset;
  merged.MergeFrom(*d);
  merged.clear_preset();
  *d = std::move(merged);
}

void validate_device_type(const ConfigScope& s, Need memory) {
  s.require("name");
  if (s.require("peak_flops_per_s")) {
    ConfigScope peak = s.child("peak_flops_per_s");
    bool any = false;
    for (const char* dtype : {"fp32", "tf32", "bf16", "fp16", "fp8"}) {
      if (!peak.has(dtype)) continue;
      any = true;
      peak.positive(dtype, Need::kOptional, /*allow_zero=*/false, kMaxFlops);
    }
    if (!any) s.error("peak_flops_per_s", "give the peak of at least one data type (fp32, tf32, bf16, fp16, fp8)");
  }
  s.positive("memory_bytes", memory, /*allow_zero=*/false, kMaxBytes);
  check_bandwidth(s, "memory_bandwidth_Bps", Need::kRequired);
  check_latency(s, "kernel_launch_overhead_s");
}

const Registry<hw::DeviceType>& device_presets() {
  static const Registry<hw::DeviceType> registry = [] {
    Registry<hw::DeviceType> r("device type");
    for (const Preset& p : kPresets) {
      hw::DeviceType d;
      MOESIM_ASSERT(google::protobuf::TextFormat::ParseFromString(p.textproto, &d), "preset {} does not parse",
                    p.name);
      r.add(p.name, p.description, std::move(d));
    }
    return r;
  }();
  return registry;
}

}  // namespace moesim::topo
