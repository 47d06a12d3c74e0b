// Errors of the executor: library calls (MPI, CUDA, cuBLAS, NCCL, OpenBLAS) go through check
// macros that name the file and line, the rank when known, the call and the library's message.
#pragma once

#include <stdexcept>
#include <string>

namespace moesim::exec {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace moesim::exec
