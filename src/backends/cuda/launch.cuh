// Kernel launches with programmatic dependent launch (PDL, sm_90).
//
// A decode step is ~300 small kernels, each a few µs, so the gap between one kernel's end and the
// next one's start is a large share of the step. A kernel launched through launch_pdl may be
// scheduled while the kernel before it in the stream finishes: it must call pdl_begin() before it
// reads or writes any memory an earlier kernel touches (only constant inputs such as weights may be
// read before it — the GEMV streams its first weights there). pdl_begin() first lets the next
// kernel be scheduled, then waits for the earlier kernel to complete (and, through that kernel's
// own wait, for everything before it). Triggering first means a chain of small kernels is resident
// and waiting before its predecessors end, and the GEMV after it starts streaming weights while
// they run; a kernel launches only once every block of the one before has started, so waiting
// dependents never take the slots of a grid they wait for. HLA_CUDA_PDL=0 launches plainly (the
// A/B switch for timings).
#pragma once
#include <cuda_runtime.h>

#include "backends/cuda/delta_rule_cuda.h"

namespace hla::cuda {

bool pdl_enabled();
// How many blocks of `kernel` (threads each, smem bytes of dynamic shared memory) the current
// device holds at once: the grid of a persistent kernel.
int blocks_on_card(const void* kernel, int threads, size_t smem = 0);

__device__ __forceinline__ void pdl_begin() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// `cluster` > 1: thread-block clusters of that many consecutive blocks along x (grid.x a multiple).
template <class... Params, class... Args>
void launch_pdl_cluster(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        unsigned cluster, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[2]{};
  unsigned n = 0;
  if (pdl_enabled()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n++].val.clusterDim = {cluster, 1, 1};
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = stream;
  cfg.attrs = attr, cfg.numAttrs = n;
  check_cuda(cudaLaunchKernelEx(&cfg, kernel, Params(args)...), what);
}

template <class... Params, class... Args>
void launch_pdl(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args... args) {
  launch_pdl_cluster(what, kernel, grid, block, smem, 1, stream, args...);
}

}  // namespace hla::cuda
