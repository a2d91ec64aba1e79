// 16 x 16 float transpose in AVX-512 registers, for the CPU kernels' packing routines (the GEMM's
// transposed operands, the LSTM's gate tiles). Include only where x86-64 intrinsics exist; callers are
// target("avx512f") functions chosen at run time.
#pragma once

#include <immintrin.h>

namespace fastattn {
namespace avx512 {

// out[c] = column c of the 16 x 16 block whose rows are r[0..15]: unpack pairs of rows, shuffle
// pairs of pairs (so each 128-bit lane holds one column of four rows), then two rounds of 128-bit
// lane shuffles.
__attribute__((target("avx512f"), always_inline)) inline void transpose16x16(const __m512 (&r)[16],
                                                                             __m512 (&out)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);      // per 128-bit lane: r_i[0] r_i+1[0] r_i[1] r_i+1[1]
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // r_i[2] r_i+1[2] r_i[3] r_i+1[3]
  }
  for (int g = 0; g < 16; g += 4) {  // rows g..g+3: u[g + e] holds element e of each 128-bit lane
    u[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int e = 0; e < 4; ++e) {  // columns e, e+4, e+8, e+12: gather lane 0..3 of the four row groups
    const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88), v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD),
                 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88),
                 v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
    out[e] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    out[8 + e] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    out[4 + e] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    out[12 + e] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

}  // namespace avx512
}  // namespace fastattn
