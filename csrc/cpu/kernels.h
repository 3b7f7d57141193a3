// Declarations of the two compiled variants of the CPU grad_dot kernel.
#pragma once
#include <cstdint>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace hybrid_accel {
#define HA_DECLARE_GRAD_DOT                                                                                   \
  template <typename feat_t, typename grad_t, typename acc_t>                                                 \
  void grad_dot_partials(const feat_t* h, const grad_t* g, const acc_t* W, const acc_t* bias, acc_t* partial, \
                         int64_t B, int64_t F, int64_t C, int64_t RC, int64_t P, int64_t block, int num_threads);
namespace cpu_generic { HA_DECLARE_GRAD_DOT }
namespace cpu_avx2 { HA_DECLARE_GRAD_DOT }
#undef HA_DECLARE_GRAD_DOT
}  // namespace hybrid_accel
