// Fused RoPE for q and k in one dispatch (body for mx.fast.metal_kernel).
// Inputs:  q (B, Hq, L, D) T, k (B, Hk, L, D) T, inv_freq (R/2) float32, offsets (B) int32,
//          params int32 [Hq, Hk, L, D, R, traditional].
// Outputs: q_out (B, Hq, L, D) T, k_out (B, Hk, L, D) TK (TK = the cache dtype, so the rotated
//          keys land ready for the in-place cache slot update).
// Grid: (D/2, L, B*(Hq+Hk)) threads, threadgroup (D/2, 1, 1). One thread per feature pair:
// pairs below R/2 are rotated at position offsets[b] + l, the rest (partial RoPE) copied.
const int Hq = params[0], Hk = params[1], L = params[2], D = params[3], R = params[4];
const bool traditional = params[5] != 0;
const int p = thread_position_in_grid.x;
const int l = thread_position_in_grid.y;
const int z = thread_position_in_grid.z;
const int H = Hq + Hk;
const int b = z / H, h = z % H;
const bool is_q = h < Hq;
const int64_t row = is_q ? (int64_t(b * Hq + h) * L + l) * D
                         : (int64_t(b * Hk + (h - Hq)) * L + l) * D;

int i0, i1;
float r0, r1;
if (p < R / 2) {
  i0 = rope_first(p, R / 2, traditional);
  i1 = rope_second(p, R / 2, traditional);
  const float x0 = is_q ? float(q[row + i0]) : float(k[row + i0]);
  const float x1 = is_q ? float(q[row + i1]) : float(k[row + i1]);
  const float theta = float(offsets[b] + l) * inv_freq[p];
  const float c = metal::precise::cos(theta), s = metal::precise::sin(theta);
  r0 = x0 * c - x1 * s;
  r1 = x0 * s + x1 * c;
} else {
  i0 = R + 2 * (p - R / 2);
  i1 = i0 + 1;
  r0 = is_q ? float(q[row + i0]) : float(k[row + i0]);
  r1 = is_q ? float(q[row + i1]) : float(k[row + i1]);
}
if (is_q) {
  q_out[row + i0] = T(r0);
  q_out[row + i1] = T(r1);
} else {
  k_out[row + i0] = TK(r0);
  k_out[row + i1] = TK(r1);
}
