// Shared by rope.metal and attn_decode.metal (passed as metal_kernel's `header`).
// RoPE rotates feature pairs (x0, x1) by angle = position * inv_freq[pair]:
//   x0' = x0 cos - x1 sin,  x1' = x0 sin + x1 cos.
// Pair p holds features (2p, 2p+1) in the traditional layout, (p, p + half) in rotate-half.
// inv_freq already includes the linear position scale and any llama3/freq-factor table.

inline int rope_first(int p, int half_dims, bool traditional) {
  return traditional ? 2 * p : p;
}

inline int rope_second(int p, int half_dims, bool traditional) {
  return traditional ? 2 * p + 1 : p + half_dims;
}
