// Merge the per-split partial results of attn_decode.metal (body for mx.fast.metal_kernel).
// Template: T (output dtype), D (head dim).
// Inputs:  o_part (n_splits, rows, D) float32 unnormalized outputs, ml_part (n_splits, rows, 2)
//          float32 (running max in the log2 domain, softmax denominator), params int32
//          [n_splits, rows].
// Outputs: out (rows, D) T.
// Grid: (32, rows, 1), threadgroup (32, 1, 1): one simdgroup per query row, lanes over D.
const int n_splits = params[0], rows = params[1];
const int row = threadgroup_position_in_grid.y;
const int lane = thread_position_in_threadgroup.x;
float M = -1.0e30f;
for (int s = 0; s < n_splits; s++) M = metal::max(M, ml_part[(int64_t(s) * rows + row) * 2]);
float L = 0.0f;
for (int s = 0; s < n_splits; s++) {
  const int64_t i = (int64_t(s) * rows + row) * 2;
  L += ml_part[i + 1] * metal::exp2(ml_part[i] - M);
}
const float inv_l = L > 0.0f ? 1.0f / L : 0.0f;
for (int d = lane; d < D; d += 32) {
  float O = 0.0f;
  for (int s = 0; s < n_splits; s++) {
    const int64_t i = int64_t(s) * rows + row;
    O += o_part[i * D + d] * metal::exp2(ml_part[i * 2] - M);
  }
  out[int64_t(row) * D + d] = T(O * inv_l);
}
