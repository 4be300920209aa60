// Large CPU outputs (a locally connected layer's weight gradient is tens of MiB, produced at every
// training step) reuse freed blocks of the same size instead of a fresh mapping each time: faulting
// in fresh pages, which the kernel zeroes first, cost as much as computing the gradient. At most
// kMaxCachedBytes of freed blocks are kept; empty_cpu_cache() releases them, as
// torch.cuda.empty_cache() does on the GPU.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace reggan_ext {

// Outputs below this size come from at::empty: glibc keeps freed blocks of up to 32 MiB (its
// largest mmap threshold) on its heap and hands them out again itself.
constexpr int64_t kCachedOutputBytes = int64_t(32) << 20;
constexpr int64_t kMaxCachedBytes = int64_t(1) << 30;

// at::empty(sizes, options) for a contiguous CPU output, in transparent huge pages where the
// kernel offers them, and from the cache from kCachedOutputBytes on.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the cached blocks; returns their bytes.
int64_t empty_cpu_cache();

// Bytes in cached blocks, free for reuse.
int64_t cpu_cache_bytes();

}  // namespace reggan_ext
