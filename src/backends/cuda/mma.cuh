// Warp-level tensor-core tiles over shared memory (mma.sync, sm_80+; runs on sm_90a).
//
// One warp computes C[16 x 8·NT] += A[16 x kdim] · B[kdim x 8·NT] with fp32 accumulators, where
// A and B are read through accessors (shared-memory views, optionally transposed). The element
// type CT of the views picks the instruction:
//   bf16 / fp16 -> mma.m16n8k16 with that operand type (what bf16/fp16 inputs use);
//   float       -> three tf32 mma.m16n8k8 per step (a_hi·b_hi + a_hi·b_lo + a_lo·b_hi, the
//                  "3xTF32" split), which keeps ~fp32 accuracy: fp32 inputs must land within 1e-4
//                  of an fp64 reference, and a single tf32 product (10-bit mantissa) would not.
//   tf32        -> one tf32 mma.m16n8k8 per step over the same fp32 views: a third of the tensor
//                  work and no split, with a rounding 8x finer than bf16's, for fp32 math on
//                  operands that came from bf16 (their own rounding dominates the error).
// Fragment layouts follow the PTX ISA ("Matrix fragments for mma.m16n8k16 / m16n8k8"): lane l owns
// rows l/4 and l/4+8 of A and C, columns 2·(l%4)+{0,1} of C, and column l/4 of B.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace hla::cuda {

// The marker type that picks single-tf32 products over fp32 views in warp_mma (see above).
struct tf32 {};

template <class T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// Two 16-bit operands packed low/high into one 32-bit mma register.
template <class CT>
__device__ __forceinline__ uint32_t pack_pair(CT lo, CT hi) {
  return uint32_t(reinterpret_cast<const uint16_t&>(lo)) | (uint32_t(reinterpret_cast<const uint16_t&>(hi)) << 16);
}

// A view of a shared-memory tile as a matrix M(x, k): x is the row of A (or the column of B), k the
// reduction index. KMajor: element at p[x*ld + k] (k contiguous, pairs load as one 32-bit word);
// otherwise at p[k*ld + x].
template <class CT, bool KMajor>
struct View {
  const CT* p;
  int ld;
  __device__ __forceinline__ CT at(int x, int k) const { return KMajor ? p[x * ld + k] : p[k * ld + x]; }
  // Elements (x,k) and (x,k+1) packed low/high, as the 16-bit mma operands want them.
  __device__ __forceinline__ uint32_t pair(int x, int k) const {
    if constexpr (KMajor) {
      return *reinterpret_cast<const uint32_t*>(p + x * ld + k);
    } else {
      return pack_pair(p[k * ld + x], p[(k + 1) * ld + x]);
    }
  }
};

// ldmatrix: each lane names one 16-byte row of an 8x8 16-bit matrix (lanes 8m..8m+7 for matrix
// m); lane l receives elements (l/4, 2(l%4)+{0,1}) of each, or of its transpose with .trans, which
// is what turns a k-major or x-major tile into mma fragments in one instruction per 2-4 registers
// (instead of 2-byte loads and packing for the transposed operands).
// a: the lane's row, as a shared-memory address (smem_addr).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}
// Shared-memory operands as 32-bit shared-window addresses: half the registers of a generic
// pointer, no per-use conversion.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// Fragments of an m16n8k16 mma from a view, at reduction offset k0. The generic forms gather
// pairs; a 16-bit shared-memory View uses ldmatrix, which needs 16-byte aligned rows (pitches and
// tile offsets in the kernels are multiples of 8 elements).
//   A: rows 0..15 -> {(r, k0+2q), (r+8, k0+2q), (r, k0+8+2q), (r+8, k0+8+2q)}
//   B: columns n0..n0+7 -> {(n0+r, k0+2q), (n0+r, k0+8+2q)}; frag_b2 also n0+8..n0+15 in f[2..3]
template <class VA>
__device__ __forceinline__ void frag_a(uint32_t (&f)[4], const VA& a, int k0) {
  const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  f[0] = a.pair(r, k0 + 2 * q), f[1] = a.pair(r + 8, k0 + 2 * q);
  f[2] = a.pair(r, k0 + 2 * q + 8), f[3] = a.pair(r + 8, k0 + 2 * q + 8);
}
template <class VB>
__device__ __forceinline__ void frag_b(uint32_t (&f)[2], const VB& b, int n0, int k0) {
  const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  f[0] = b.pair(n0 + r, k0 + 2 * q), f[1] = b.pair(n0 + r, k0 + 2 * q + 8);
}
template <class VB>
__device__ __forceinline__ void frag_b2(uint32_t (&f)[4], const VB& b, int n0, int k0) {
  const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  f[0] = b.pair(n0 + r, k0 + 2 * q), f[1] = b.pair(n0 + r, k0 + 2 * q + 8);
  f[2] = b.pair(n0 + 8 + r, k0 + 2 * q), f[3] = b.pair(n0 + 8 + r, k0 + 2 * q + 8);
}
// ldmatrix forms for 16-bit views. Matrix m = lane/8 of an x4 load holds A's block
// (x + 8·(m&1), k + 8·(m>>1)) and B's block (n + 8·(m>>1), k + 8·(m&1)); lane i = lane%8 names
// row i of its matrix as stored: an x (or n) row for k-major views, a k row otherwise (.trans).
template <class CT, bool KMajor>
__device__ __forceinline__ void frag_a(uint32_t (&f)[4], const View<CT, KMajor>& a, int k0) {
  const int l = threadIdx.x & 31, i = l & 7, m = l >> 3;
  const int x = 8 * (m & 1), k = k0 + 8 * (m >> 1);
  if constexpr (KMajor) ldmatrix_x4(f, smem_addr(a.p + (x + i) * a.ld + k));
  else ldmatrix_x4_trans(f, smem_addr(a.p + (k + i) * a.ld + x));
}
template <class CT, bool KMajor>
__device__ __forceinline__ void frag_b2(uint32_t (&f)[4], const View<CT, KMajor>& b, int n0, int k0) {
  const int l = threadIdx.x & 31, i = l & 7, m = l >> 3;
  const int n = n0 + 8 * (m >> 1), k = k0 + 8 * (m & 1);
  if constexpr (KMajor) ldmatrix_x4(f, smem_addr(b.p + (n + i) * b.ld + k));
  else ldmatrix_x4_trans(f, smem_addr(b.p + (k + i) * b.ld + n));
}
template <class CT, bool KMajor>
__device__ __forceinline__ void frag_b(uint32_t (&f)[2], const View<CT, KMajor>& b, int n0, int k0) {
  const int l = threadIdx.x & 31, i = l & 7, k = k0 + 8 * ((l >> 3) & 1);  // lanes 16..31 repeat 0..15
  if constexpr (KMajor) ldmatrix_x2(f, smem_addr(b.p + (n0 + i) * b.ld + k));
  else ldmatrix_x2_trans(f, smem_addr(b.p + (k + i) * b.ld + n0));
}

// A float tile in shared memory read as CT operands (k contiguous), rounding on the fly: the
// triangular inverse T is solved in fp32 and only rounded where it enters a matmul.
template <class CT>
struct F32View {
  const float* p;
  int ld;
  __device__ __forceinline__ CT at(int x, int k) const { return from_f32<CT>(p[x * ld + k]); }
  __device__ __forceinline__ uint32_t pair(int x, int k) const { return pack_pair(at(x, k), at(x, k + 1)); }
};

// What rounding the same float tile to CT loses, as CT operands: an F32View product plus an
// F32LowView product carries the float through two MMAs to about twice CT's mantissa bits.
template <class CT>
struct F32LowView {
  const float* p;
  int ld;
  __device__ __forceinline__ CT at(int x, int k) const {
    const float v = p[x * ld + k];
    return from_f32<CT>(v - to_f32(from_f32<CT>(v)));
  }
  __device__ __forceinline__ uint32_t pair(int x, int k) const { return pack_pair(at(x, k), at(x, k + 1)); }
};

__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_f16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_tf32(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
// x = hi + lo with both parts representable in tf32.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));
}

// C[16 x 8·NT] += A[16 x kdim] · B[kdim x 8·NT]; kdim a multiple of 16. The warp's A rows are
// a(0..15, ·); B column n of n-tile t is b(8t + n, ·).
template <class CT, int NT, class VA, class VB>
__device__ __forceinline__ void warp_mma(float (&c)[NT][4], const VA& a, const VB& b, int kdim) {
  const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
  if constexpr (sizeof(CT) == 2) {
    auto mma = [](float(&acc)[4], const uint32_t* af, const uint32_t* bf) {
      if constexpr (std::is_same_v<CT, __half>)
        mma_f16(acc, af, bf);
      else
        mma_bf16(acc, af, bf);
    };
    auto step = [&](float(&acc)[NT][4], int k0) {
      uint32_t af[4];
      frag_a(af, a, k0);
#pragma unroll
      for (int t = 0; t + 1 < NT; t += 2) {
        uint32_t bf[4];
        frag_b2(bf, b, 8 * t, k0);
        mma(acc[t], af, bf);
        mma(acc[t + 1], af, bf + 2);
      }
      if constexpr (NT % 2 == 1) {
        uint32_t bf[2];
        frag_b(bf, b, 8 * (NT - 1), k0);
        mma(acc[NT - 1], af, bf);
      }
    };
    int k0 = 0;
    if constexpr (NT <= 2) {
      // With one or two n-tiles every mma of a k-step feeds the same chain of accumulators: odd
      // k-steps go to a second set, so two dependent chains interleave (summed at the end, in a
      // fixed order).
      float c2[NT][4] = {};
      for (; k0 + 32 <= kdim; k0 += 32) {
        step(c, k0);
        step(c2, k0 + 16);
      }
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[t][e] += c2[t][e];
    }
    for (; k0 < kdim; k0 += 16) step(c, k0);
  } else if constexpr (std::is_same_v<CT, tf32>) {
    for (int k0 = 0; k0 < kdim; k0 += 8) {
      const uint32_t af[4] = {to_tf32(a.at(r, k0 + q)), to_tf32(a.at(r + 8, k0 + q)), to_tf32(a.at(r, k0 + q + 4)),
                              to_tf32(a.at(r + 8, k0 + q + 4))};
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const uint32_t bf[2] = {to_tf32(b.at(8 * t + r, k0 + q)), to_tf32(b.at(8 * t + r, k0 + q + 4))};
        mma_tf32(c[t], af, bf);
      }
    }
  } else {
    static_assert(std::is_same_v<CT, float>, "warp_mma: CT is bf16, fp16, float (3xTF32) or tf32");
    for (int k0 = 0; k0 < kdim; k0 += 8) {
      uint32_t ah[4], al[4];
      split_tf32(a.at(r, k0 + q), ah[0], al[0]);
      split_tf32(a.at(r + 8, k0 + q), ah[1], al[1]);
      split_tf32(a.at(r, k0 + q + 4), ah[2], al[2]);
      split_tf32(a.at(r + 8, k0 + q + 4), ah[3], al[3]);
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        uint32_t bh[2], bl[2];
        split_tf32(b.at(8 * t + r, k0 + q), bh[0], bl[0]);
        split_tf32(b.at(8 * t + r, k0 + q + 4), bh[1], bl[1]);
        mma_tf32(c[t], al, bh);
        mma_tf32(c[t], ah, bl);
        mma_tf32(c[t], ah, bh);
      }
    }
  }
}

// Visits the accumulator elements a lane owns as column pairs: f(row, col, x[col], x[col+1]).
template <int NT, class F>
__device__ __forceinline__ void for_each_acc_pair(const float (&c)[NT][4], F&& f) {
  const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int h = 0; h < 2; ++h) f(r + 8 * h, 8 * t + 2 * q, c[t][2 * h], c[t][2 * h + 1]);
}

// Visits the accumulator elements a lane owns: f(row, col, value&) with row in [0,16), col in
// [0, 8·NT).
template <int NT, class F>
__device__ __forceinline__ void for_each_acc(float (&c)[NT][4], F&& f) {
  const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) f(r + (e >> 1) * 8, 8 * t + 2 * q + (e & 1), c[t][e]);
}

// Stores a warp's C tile [16 x 8·NT] as CT rows. For 16-bit CT (NT == 1, 2 or a multiple of 4) it
// uses 4-, 8- or 16-byte stores instead of one 2-byte store per element (which fills 8 bytes of
// each 32-byte sector a store touches): the quad of lanes sharing a row swaps its packed column
// pairs (xor-1 then xor-2 exchanges, a 4x4 transpose) so that each lane holds 4 (NT == 2) or 8
// contiguous columns. fp32 pairs are stored as they are (a quad already writes 32 bytes).
//   val(row, col, x) -> float: the value to store for accumulator x (scaling, masking);
//   dst(row, col) -> CT*: where the piece starting at (row, col) goes, nullptr to skip the row.
struct AsIs {
  __device__ float operator()(int, int, float x) const { return x; }
};
template <class CT, int NT, class Val, class Dst>
__device__ __forceinline__ void store_acc_rows(const float (&c)[NT][4], Val val, Dst dst) {
  if constexpr (sizeof(CT) == 4) {
    for_each_acc_pair(c, [&](int row, int col, float x0, float x1) {
      if (CT* p = dst(row, col)) *reinterpret_cast<float2*>(p) = make_float2(val(row, col, x0), val(row, col + 1, x1));
    });
  } else {
    static_assert(NT <= 2 || NT % 4 == 0, "16-bit rows of 8, 16 or 32·k columns");
    constexpr int G = NT <= 2 ? NT : 4;  // n-tiles per exchange group
    const int lane = threadIdx.x & 31, r = lane >> 2, q = lane & 3;
    const bool odd = q & 1, hi = q & 2;
    const int col0 = G == 1 ? 2 * q : G == 2 ? (q & 1) * 8 + (q >> 1) * 4 : (q >> 1) * 16 + (q & 1) * 8;
#pragma unroll
    for (int g = 0; g < NT; g += G)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = r + 8 * h;
        uint32_t w[G];
#pragma unroll
        for (int t = 0; t < G; ++t) {
          const int col = 8 * (g + t) + 2 * q;
          w[t] = pack_pair(from_f32<CT>(val(row, col, c[g + t][2 * h])),
                           from_f32<CT>(val(row, col + 1, c[g + t][2 * h + 1])));
        }
#pragma unroll
        for (int t = 0; t + 1 < G; t += 2) {
          const uint32_t got = __shfl_xor_sync(~0u, odd ? w[t] : w[t + 1], 1);
          w[t] = odd ? got : w[t];
          w[t + 1] = odd ? w[t + 1] : got;
        }
        if constexpr (G == 4) {
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            const uint32_t got = __shfl_xor_sync(~0u, hi ? w[t] : w[t + 2], 2);
            w[t] = hi ? got : w[t];
            w[t + 2] = hi ? w[t + 2] : got;
          }
        }
        CT* p = dst(row, 8 * g + col0);
        if (!p) continue;
        if constexpr (G == 4)
          *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
        else if constexpr (G == 2)
          *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
        else
          *reinterpret_cast<uint32_t*>(p) = w[0];
      }
  }
}

}  // namespace hla::cuda
