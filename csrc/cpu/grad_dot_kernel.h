// Raw-pointer CPU kernel for grad_dot, compiled twice (generic and AVX2+FMA) into separate namespaces.
// Include only after the c10 scalar-type headers, inside the namespace chosen by the including file.
//
// For instance b and a block of pixels, the kernel projects each pixel's feature vector onto the
// reference rows (u[j][p] = W[j] . h[:, p]) in register tiles of PV pixels x NJ rows, then dots the
// result with the logit gradient: partial[b, blk, j] = sum_p g[b, j % C, p] * (u[j][p] + bias[j]).
// h is read once per tile, contiguous along pixels; nothing of size C x F per instance is stored.

constexpr int PV = 16;  // pixels per register tile
constexpr int kPrefetchTiles = 4;  // how far ahead along a row the next tiles are fetched

inline float load_acc(const float* p) { return *p; }
inline double load_acc(const double* p) { return *p; }
inline float load_acc(const c10::BFloat16* p) {
  // bfloat16 -> float is a 16-bit shift; written out so the compiler vectorises it
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float load_acc(const c10::Half* p) { return static_cast<float>(*p); }

template <int NJ, typename feat_t, typename acc_t>
inline void project_tile(const feat_t* h, int64_t P, int64_t F, const acc_t* W, int64_t n, acc_t (&u)[NJ][PV]) {
  for (int j = 0; j < NJ; ++j)
    for (int v = 0; v < PV; ++v) u[j][v] = 0;
  if (n == PV) {
    for (int64_t f = 0; f < F; ++f) {
      acc_t hv[PV];
      const feat_t* row = h + f * P;
      // Each tile touches F rows that lie P elements apart: more streams than the hardware
      // prefetcher follows, so fetch this row's next tiles explicitly.
      __builtin_prefetch(row + kPrefetchTiles * PV);
      for (int v = 0; v < PV; ++v) hv[v] = load_acc(row + v);
      for (int j = 0; j < NJ; ++j) {
        const acc_t w = W[j * F + f];
        for (int v = 0; v < PV; ++v) u[j][v] += w * hv[v];
      }
    }
  } else {  // ragged tail: P need not be a multiple of anything
    for (int64_t f = 0; f < F; ++f) {
      acc_t hv[PV];
      const feat_t* row = h + f * P;
      for (int v = 0; v < PV; ++v) hv[v] = v < n ? load_acc(row + v) : acc_t(0);
      for (int j = 0; j < NJ; ++j) {
        const acc_t w = W[j * F + f];
        for (int v = 0; v < PV; ++v) u[j][v] += w * hv[v];
      }
    }
  }
}

template <int NJ, typename feat_t, typename grad_t, typename acc_t>
inline void tile_rows(const feat_t* h, const grad_t* g, const acc_t* W, const acc_t* bias, acc_t* part, int64_t j0,
                      int64_t C, int64_t P, int64_t F, int64_t p0, int64_t n) {
  acc_t u[NJ][PV];
  project_tile<NJ>(h + p0, P, F, W + j0 * F, n, u);
  for (int j = 0; j < NJ; ++j) {
    const int64_t jj = j0 + j;
    const grad_t* gr = g + (jj % C) * P + p0;
    const acc_t bj = bias ? bias[jj] : acc_t(0);
    acc_t s = 0;
    for (int64_t v = 0; v < n; ++v) s += load_acc(gr + v) * (u[j][v] + bj);
    part[jj] += s;
  }
}

// partial: [B, nblk, RC], nblk = ceil(P / block). Deterministic: each (b, blk) is one task.
template <typename feat_t, typename grad_t, typename acc_t>
void grad_dot_partials(const feat_t* h, const grad_t* g, const acc_t* W, const acc_t* bias, acc_t* partial, int64_t B,
                       int64_t F, int64_t C, int64_t RC, int64_t P, int64_t block, int num_threads) {
  const int64_t nblk = (P + block - 1) / block;
  const int64_t ntask = B * nblk;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (ntask > 1)
  for (int64_t task = 0; task < ntask; ++task) {
    const int64_t b = task / nblk, blk = task % nblk;
    const feat_t* hb = h + b * F * P;
    const grad_t* gb = g + b * C * P;
    acc_t* part = partial + task * RC;
    for (int64_t j = 0; j < RC; ++j) part[j] = 0;
    const int64_t pend = std::min(P, (blk + 1) * block);
    for (int64_t p0 = blk * block; p0 < pend; p0 += PV) {
      const int64_t n = std::min<int64_t>(PV, pend - p0);
      int64_t j0 = 0;
      for (; j0 + 4 <= RC; j0 += 4) tile_rows<4>(hb, gb, W, bias, part, j0, C, P, F, p0, n);
      switch (RC - j0) {
        case 3: tile_rows<3>(hb, gb, W, bias, part, j0, C, P, F, p0, n); break;
        case 2: tile_rows<2>(hb, gb, W, bias, part, j0, C, P, F, p0, n); break;
        case 1: tile_rows<1>(hb, gb, W, bias, part, j0, C, P, F, p0, n); break;
        default: break;
      }
    }
  }
}

#define HA_INSTANTIATE_GRAD_DOT(feat_t, grad_t, acc_t)                                                             \
  template void grad_dot_partials<feat_t, grad_t, acc_t>(const feat_t*, const grad_t*, const acc_t*, const acc_t*, \
                                                         acc_t*, int64_t, int64_t, int64_t, int64_t, int64_t,      \
                                                         int64_t, int);
#define HA_INSTANTIATE_ALL_GRAD_DOT                          \
  HA_INSTANTIATE_GRAD_DOT(double, double, double)            \
  HA_INSTANTIATE_GRAD_DOT(float, float, float)               \
  HA_INSTANTIATE_GRAD_DOT(c10::BFloat16, c10::BFloat16, float) \
  HA_INSTANTIATE_GRAD_DOT(c10::BFloat16, float, float)       \
  HA_INSTANTIATE_GRAD_DOT(c10::Half, c10::Half, float)       \
  HA_INSTANTIATE_GRAD_DOT(c10::Half, float, float)
