// Hopper's bulk tensor copies (TMA, sm_90) and the shared-memory barriers they complete on.
//
// A tensor map (built once on the host, passed by value as a __grid_constant__ kernel parameter)
// describes a row-major 2-D bf16 matrix and the box one copy moves; a single thread then copies a
// whole box into shared memory, swizzled as wgmma.cuh's tiles are, while the warps that computed
// the last box keep computing. The copy engine reports the bytes it wrote to an mbarrier, whose
// phase flips when the expected bytes (and arrivals) are all in: consumers wait on the parity.
// Boxes past the matrix's edge (rows past the end, columns past K) are filled with zeros.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/mma.cuh"
#include "core/error.h"

namespace hla::cuda {

// A tensor map of W [rows, cols] (bf16, row-major, cols a multiple of 8, W 16-byte aligned) whose
// boxes are box_rows x 64 columns (128 bytes a row) in the 128-byte swizzle.
inline CUtensorMap tensor_map_bf16(const void* W, int64_t rows, int64_t cols, int box_rows) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found),
               "cuTensorMapEncodeTiled lookup");
    check(found == cudaDriverEntryPointSuccess && fn, "the CUDA driver has no cuTensorMapEncodeTiled (TMA)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)}, strides[1] = {cuuint64_t(cols) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)}, unit[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(W), dims, strides, box, unit,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  check(r == CUDA_SUCCESS, "internal: cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ")");
  return map;
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// Makes initialised barriers visible to the copy engine (then a __syncthreads for the threads).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// The barriers of an S-stage producer/consumer ring, by one thread (then a __syncthreads): full[s]
// completes when stage s's bytes have landed (one arrival, the producer's mbarrier_expect),
// empty[s] when all `consumers` have released the stage.
template <int S>
__device__ __forceinline__ void ring_barriers_init(uint64_t (&full)[S], uint64_t (&empty)[S], int consumers) {
  for (int s = 0; s < S; ++s) mbarrier_init(&full[s], 1), mbarrier_init(&empty[s], consumers);
  mbarrier_init_fence();
}
// Arrives and announces `bytes` more that copies will deliver to this phase.
__device__ __forceinline__ void mbarrier_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Waits until the phase of the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// Copies the box at (column col, row row) of `map` to shared memory at dst (1024-byte aligned),
// completing on bar.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap& map, int col, int row, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(col), "r"(row), "r"(smem_addr(bar))
      : "memory");
}

}  // namespace hla::cuda
