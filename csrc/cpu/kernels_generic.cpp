// Baseline-ISA build of the CPU grad_dot kernel (runs on any x86-64 or other CPU).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#include "kernels.h"

namespace hybrid_accel {
namespace cpu_generic {
#include "grad_dot_kernel.h"
HA_INSTANTIATE_ALL_GRAD_DOT
}  // namespace cpu_generic
}  // namespace hybrid_accel
