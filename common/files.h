// Writing files whole: a reader (or a second run) never sees half a file.
#pragma once

#include <string>
#include <string_view>

namespace moesim {

// Writes `bytes` to `path` through a temporary file beside it and a rename. On failure the
// temporary file is removed, `path` is left as it was, and the reason is returned; "" when done.
std::string write_file_atomically(const std::string& path, std::string_view bytes);

}  // namespace moesim
