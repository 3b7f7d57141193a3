// Raw-pointer CPU kernel for grad_dot, compiled twice (generic and AVX2+FMA) into separate namespaces.
// Include only after the c10 scalar-type headers, inside the namespace chosen by the including file.
//
// For instance b and a block of pixels, the kernel projects each pixel's feature vector onto the
// reference rows (u[j][p] = W[j] . h[:, p]), then dots the result with the logit gradient:
// partial[b, blk, j] = sum_p g[b, j % C, p] * (u[j][p] + bias[j]). h is read once, contiguous along
// pixels; nothing of size C x F per instance is stored.

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

constexpr int kRowGroup = 8;  // feature rows streamed together: 8 prefetcher streams, u touched once per group

// u[j][p] += sum_r w[j][r] * rows[r][p] for NJ reference rows and FG feature rows, over n pixels.
// The pixel loop is the vectorised one; u is loaded and stored once per group of FG feature rows.
template <int NJ, int FG, typename feat_t, typename acc_t>
inline void accumulate_rows(const feat_t* const (&rows)[FG], const acc_t (&w)[NJ][FG], acc_t* const (&u)[NJ],
                            int64_t n) {
#pragma GCC ivdep
  for (int64_t p = 0; p < n; ++p) {
    acc_t a[NJ];
    for (int j = 0; j < NJ; ++j) a[j] = u[j][p];
    for (int r = 0; r < FG; ++r) {
      const acc_t hv = load_acc(rows[r] + p);
      for (int j = 0; j < NJ; ++j) a[j] += w[j][r] * hv;
    }
    for (int j = 0; j < NJ; ++j) u[j][p] = a[j];
  }
}

// u[j0 + j][:] = W[j0 + j] . h[:, :] for NJ reference rows over one block of n pixels.
template <int NJ, typename feat_t, typename acc_t>
inline void project_block(const feat_t* hb, int64_t P, int64_t F, const acc_t* W, int64_t j0, acc_t* u, int64_t block,
                          int64_t n) {
  acc_t* uj[NJ];
  for (int j = 0; j < NJ; ++j) {
    uj[j] = u + (j0 + j) * block;
    std::fill(uj[j], uj[j] + n, acc_t(0));
  }
  int64_t f = 0;
  for (; f + kRowGroup <= F; f += kRowGroup) {
    const feat_t* rows[kRowGroup];
    acc_t w[NJ][kRowGroup];
    for (int r = 0; r < kRowGroup; ++r) {
      rows[r] = hb + (f + r) * P;
      for (int j = 0; j < NJ; ++j) w[j][r] = W[(j0 + j) * F + f + r];
    }
    accumulate_rows<NJ, kRowGroup>(rows, w, uj, n);
  }
  for (; f < F; ++f) {  // F need not be a multiple of the row group
    const feat_t* rows[1] = {hb + f * P};
    acc_t w[NJ][1];
    for (int j = 0; j < NJ; ++j) w[j][0] = W[(j0 + j) * F + f];
    accumulate_rows<NJ, 1>(rows, w, uj, n);
  }
}

// partial: [B, nblk, RC], nblk = ceil(P / block), `block` pixels per task. Deterministic: each (b, blk) is one task.
//
// Loop order: feature rows stream through in groups of kRowGroup, each row's block of pixels read once and
// contiguously (so the hardware prefetcher follows it), accumulating u[j][p] = W[j] . h[:, p] for up to four
// reference rows at a time; u (RC x block values) stays in L1/L2. Walking a small pixel tile down all F rows
// instead touches F rows that lie P elements apart, which thrashes the L1 sets when P is a multiple of 4 KiB.
template <typename feat_t, typename grad_t, typename acc_t>
void grad_dot_partials(const feat_t* h, const grad_t* g, const acc_t* W, const acc_t* bias, acc_t* partial, int64_t B,
                       int64_t F, int64_t C, int64_t RC, int64_t P, int64_t block, int num_threads) {
  const int64_t nblk = (P + block - 1) / block;
  const int64_t ntask = B * nblk;
#pragma omp parallel num_threads(num_threads) if (ntask > 1)
  {
    std::vector<acc_t> u(static_cast<size_t>(RC * block));
#pragma omp for schedule(static)
    for (int64_t task = 0; task < ntask; ++task) {
      const int64_t b = task / nblk, blk = task % nblk;
      const int64_t p0 = blk * block;
      const int64_t n = std::min(block, P - p0);
      const feat_t* hb = h + b * F * P + p0;
      int64_t j0 = 0;
      for (; j0 + 4 <= RC; j0 += 4) project_block<4>(hb, P, F, W, j0, u.data(), block, n);
      switch (RC - j0) {
        case 3: project_block<3>(hb, P, F, W, j0, u.data(), block, n); break;
        case 2: project_block<2>(hb, P, F, W, j0, u.data(), block, n); break;
        case 1: project_block<1>(hb, P, F, W, j0, u.data(), block, n); break;
        default: break;
      }
      acc_t* part = partial + task * RC;
      for (int64_t j = 0; j < RC; ++j) {
        const grad_t* gr = g + (b * C + j % C) * P + p0;
        const acc_t* uj = u.data() + j * block;
        const acc_t bj = bias ? bias[j] : acc_t(0);
        acc_t s = 0;
        for (int64_t p = 0; p < n; ++p) s += load_acc(gr + p) * (uj[p] + bj);
        part[j] = s;
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
