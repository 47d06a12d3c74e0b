// One precision policy for every floating-point comparison in moesim (solver, routing, tests),
// instead of magic epsilons scattered around. Relative tolerance with an absolute floor.
#pragma once

#include <algorithm>
#include <cmath>

namespace moesim {

inline constexpr double kRelEps = 1e-9;   // relative: values that differ less are equal
inline constexpr double kAbsEps = 1e-15;  // absolute floor for values near zero

inline bool approx_eq(double a, double b, double rel = kRelEps) {
  return std::fabs(a - b) <= std::max(kAbsEps, rel * std::max(std::fabs(a), std::fabs(b)));
}
inline bool definitely_less(double a, double b, double rel = kRelEps) { return a < b && !approx_eq(a, b, rel); }

// a - b, snapped to exactly zero when the two are equal within the policy.
inline double sub_snap(double a, double b) { return approx_eq(a, b) ? 0.0 : a - b; }

}  // namespace moesim
