// Decode attention over a pre-RoPE key cache (body for mx.fast.metal_kernel).
// Keys are stored unrotated; each key is rotated in registers by its cache position while the
// scores are computed, so the cache is read once and never rewritten.
//
// Template: T (q/k/v dtype), D (head dim, multiple of 64), ROWS (query rows per threadgroup),
//           NSG (simdgroups per threadgroup).
// Inputs:  q (B, Hq, Lq, D) unrotated queries; k, v (B, Hk, capacity, D) caches (first n_keys
//          valid); inv_freq (D/2) float32; params int32 [n_keys, capacity, Lq, G, Hk, pos0,
//          keys_per_split, traditional, n_splits, B*Hq*Lq]; fparams float32 [scale * log2(e)].
// Outputs: n_splits == 1: out (B, Hq, Lq, D) T (o_part/ml_part unused);
//          n_splits > 1: o_part (n_splits, B*Hq*Lq, D) float32 unnormalized, ml_part
//          (n_splits, B*Hq*Lq, 2) float32 (running max, sum) for attn_reduce.metal (out unused).
// Grid: (32*NSG*n_splits, n_tiles, B*Hk), threadgroup (32*NSG, 1, 1).
//
// Threadgroup (split s, tile t, kv head) takes keys [s*kps, (s+1)*kps) for the query rows
// t*ROWS.. of that kv head (its G query heads x Lq queries: the GQA group shares every K/V
// read). Simdgroup g takes key blocks of 32 (g, g+NSG, ...); lane j owns D/32 features
// (D/64 rotation pairs). Per key: rotate, dot, simd_sum; per block of 32: one max, one exp per
// key (lane j does key j) and one rescale per row; then V accumulation with the block's
// probabilities broadcast by simd_shuffle. Rotation angles advance by a complex multiply per
// key and are recomputed exactly at each block start. Query i sits at position
// pos0 + n_keys - Lq + i and sees keys up to that position (causal within the chunk).
// Angles use metal::precise:: sin/cos (a few per block), so positions in the tens of thousands
// stay accurate even where the library is built with fast math.
constexpr int P = D / 64;      // rotation pairs per lane
constexpr int E = 2 * P;       // features per lane
constexpr int BK = 32;         // keys per simdgroup block (= simd width)
constexpr float MASKED = -3.0e38f;
constexpr float M_FLOOR = -1.0e30f;  // running-max floor: finite, so exp2 never sees inf - inf

const int n_keys = params[0], cap = params[1], Lq = params[2], G = params[3], Hk = params[4];
const int pos0 = params[5], kps = params[6], n_splits = params[8], rows_total = params[9];
const bool traditional = params[7] != 0;
const float qscale = fparams[0];
threadgroup float sm_acc[NSG][ROWS][D];  // per-simdgroup partial outputs, merged at the end
threadgroup float sm_m[NSG][ROWS];
threadgroup float sm_l[NSG][ROWS];

const int lane = thread_index_in_simdgroup;
const int sg = simdgroup_index_in_threadgroup;
const int split = threadgroup_position_in_grid.x;
const int tile = threadgroup_position_in_grid.y;
const int bh = threadgroup_position_in_grid.z;  // b * Hk + kv head
const int b = bh / Hk, hk = bh % Hk;
const int Hq = Hk * G;

// This lane's features and rotation rates, fixed for the whole kernel.
int f0[P], f1[P];
float w[P], cw[P], sw[P];
for (int p = 0; p < P; p++) {
  const int pair = lane * P + p;
  f0[p] = rope_first(pair, D / 2, traditional);
  f1[p] = rope_second(pair, D / 2, traditional);
  w[p] = inv_freq[pair];
  cw[p] = metal::precise::cos(w[p]);
  sw[p] = metal::precise::sin(w[p]);
}

// Query rows of this tile: rotated to their positions, pre-scaled into the log2 domain.
float qr[ROWS][E];
int last_key[ROWS];
for (int r = 0; r < ROWS; r++) {
  const int rg = tile * ROWS + r;
  const int rc = rg < G * Lq ? rg : 0;  // padding rows compute on row 0 and are never written
  const int g = rc / Lq, i = rc % Lq;
  const int64_t qb = (int64_t(b * Hq + hk * G + g) * Lq + i) * D;
  last_key[r] = n_keys - Lq + i;
  const float pos = float(pos0 + n_keys - Lq + i);
  for (int p = 0; p < P; p++) {
    const float theta = pos * w[p];
    const float c = metal::precise::cos(theta), s = metal::precise::sin(theta);
    const float x0 = float(q[qb + f0[p]]), x1 = float(q[qb + f1[p]]);
    qr[r][2 * p] = (x0 * c - x1 * s) * qscale;
    qr[r][2 * p + 1] = (x0 * s + x1 * c) * qscale;
  }
}

float m[ROWS], l[ROWS], acc[ROWS][E];
for (int r = 0; r < ROWS; r++) {
  m[r] = M_FLOOR;
  l[r] = 0.0f;
  for (int e = 0; e < E; e++) acc[r][e] = 0.0f;
}

const int k_begin = split * kps;
const int k_end = metal::min(n_keys, k_begin + kps);
// This kv head's cache rows; 32-bit offsets inside a head (capacity * D < 2^31).
const device T* kh = k + int64_t(bh) * cap * D;
const device T* vh = v + int64_t(bh) * cap * D;
for (int blk = k_begin + sg * BK; blk < k_end; blk += NSG * BK) {
  const int nb = metal::min(BK, k_end - blk);
  float c[P], s[P];
  for (int p = 0; p < P; p++) {
    const float theta = float(pos0 + blk) * w[p];
    c[p] = metal::precise::cos(theta);
    s[p] = metal::precise::sin(theta);
  }
  float score[ROWS];  // lane j ends up holding key blk + j's score
  for (int r = 0; r < ROWS; r++) score[r] = MASKED;
  for (int j = 0; j < nb; j++) {
    const int kb = (blk + j) * D;
    float kr[E];
    for (int p = 0; p < P; p++) {
      const float x0 = float(kh[kb + f0[p]]), x1 = float(kh[kb + f1[p]]);
      kr[2 * p] = x0 * c[p] - x1 * s[p];
      kr[2 * p + 1] = x0 * s[p] + x1 * c[p];
      const float cn = c[p] * cw[p] - s[p] * sw[p];  // angle += w: next key's rotation
      s[p] = s[p] * cw[p] + c[p] * sw[p];
      c[p] = cn;
    }
    for (int r = 0; r < ROWS; r++) {
      float d = 0.0f;
      for (int e = 0; e < E; e++) d += qr[r][e] * kr[e];
      d = metal::simd_sum(d);
      if (lane == j) score[r] = blk + j <= last_key[r] ? d : MASKED;
    }
  }
  float prob[ROWS];
  for (int r = 0; r < ROWS; r++) {
    const float m_new = metal::max(m[r], metal::simd_max(score[r]));
    const float corr = metal::exp2(m[r] - m_new);
    prob[r] = metal::exp2(score[r] - m_new);
    l[r] = l[r] * corr + metal::simd_sum(prob[r]);
    m[r] = m_new;
    for (int e = 0; e < E; e++) acc[r][e] *= corr;
  }
  for (int j = 0; j < nb; j++) {
    const int vb = (blk + j) * D;
    float vv[E];
    for (int p = 0; p < P; p++) {
      vv[2 * p] = float(vh[vb + f0[p]]);
      vv[2 * p + 1] = float(vh[vb + f1[p]]);
    }
    for (int r = 0; r < ROWS; r++) {
      const float pj = metal::simd_shuffle(prob[r], ushort(j));
      for (int e = 0; e < E; e++) acc[r][e] += pj * vv[e];
    }
  }
}

// Merge the simdgroups' partial softmax states through threadgroup memory.
for (int r = 0; r < ROWS; r++) {
  for (int p = 0; p < P; p++) {
    sm_acc[sg][r][f0[p]] = acc[r][2 * p];
    sm_acc[sg][r][f1[p]] = acc[r][2 * p + 1];
  }
  if (lane == 0) {
    sm_m[sg][r] = m[r];
    sm_l[sg][r] = l[r];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (int idx = thread_index_in_threadgroup; idx < ROWS * D; idx += NSG * BK) {
  const int r = idx / D, d = idx % D;
  const int rg = tile * ROWS + r;
  if (rg >= G * Lq) continue;  // padding row
  const int64_t row = int64_t(b * Hq + hk * G + rg / Lq) * Lq + rg % Lq;
  float M = M_FLOOR;
  for (int g = 0; g < NSG; g++) M = metal::max(M, sm_m[g][r]);
  float L = 0.0f, O = 0.0f;
  for (int g = 0; g < NSG; g++) {
    const float f = metal::exp2(sm_m[g][r] - M);
    L += sm_l[g][r] * f;
    O += sm_acc[g][r][d] * f;
  }
  if (n_splits == 1) {
    out[row * D + d] = T(L > 0.0f ? O / L : 0.0f);
  } else {
    const int64_t prow = int64_t(split) * rows_total + row;
    o_part[prow * D + d] = O;
    if (d == 0) {
      ml_part[prow * 2] = M;
      ml_part[prow * 2 + 1] = L;
    }
  }
}
