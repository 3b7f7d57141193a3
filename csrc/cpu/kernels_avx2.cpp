// AVX2+FMA build of the CPU grad_dot kernel, chosen at run time when the CPU supports it.
// Every header is included before the target pragma, so only the kernel below is compiled for AVX2
// and no shared inline function gets an AVX2 body that a baseline CPU could pick up at link time.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define HA_HAVE_AVX2_BUILD 1
#endif

namespace hybrid_accel {
namespace cpu_avx2 {
#include "grad_dot_kernel.h"
HA_INSTANTIATE_ALL_GRAD_DOT
}  // namespace cpu_avx2
}  // namespace hybrid_accel

#ifdef HA_HAVE_AVX2_BUILD
#pragma GCC pop_options
#endif
