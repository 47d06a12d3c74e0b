// Human-readable quantities for tables. Values inside moesim are SI doubles (bytes, seconds,
// bytes/s, FLOP/s); these only format them. Decimal prefixes throughout (1 GB = 1e9 bytes), as
// datasheets quote memory and bandwidth.
#pragma once

#include <string>

namespace moesim {

std::string format_bytes(double bytes);           // "80 GB"
std::string format_bandwidth(double bytes_per_s); // "50 GB/s"
std::string format_flops(double flops_per_s);     // "989 TFLOP/s"
std::string format_seconds(double seconds);       // "1.5 us"
std::string format_count(double n);               // "671B", "25.6M": parameter counts

}  // namespace moesim
