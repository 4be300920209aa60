// Launchers of the CUDA ridge kernels. Plain CUDA runtime types and raw pointers, no torch
// headers: the kernels compile with nvcc alone, and the torch glue (ridge_cuda.cpp) calls them.
// Tensors are contiguous in the layouts of ridge/ridge_math.h; each launcher enqueues on
// `stream` and returns the launch's error code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ridge/ridge_math.h"

namespace reggan_ext {

// Adds one batch's statistics to gram, cross and target_sq (ridge_accumulate_). Instantiated for
// (in_t, acc_t) = (float, double), (double, double) and (float, float).
template <typename in_t, typename acc_t>
cudaError_t launch_ridge_accumulate(const in_t* input, const in_t* target, acc_t* gram,
                                    acc_t* cross, acc_t* target_sq, const RidgeGeometry& rg,
                                    cudaStream_t stream);

// Whether the solve and inverse trace of systems of `unknowns` entries of `entry_bytes` factor
// in global memory (a thread per system), and so use `work` and `scratch` below; systems solved
// by a warp each are factored in shared memory and leave both untouched.
bool ridge_factors_in_global_memory(int64_t unknowns, size_t entry_bytes);

// Factors gram (groups, D(D+1)/2, pixels), in work of the same size where
// ridge_factors_in_global_memory, and overwrites solution = cross (groups * out_per_group, D,
// pixels) with the solutions of ridge_solve; info (groups, pixels). Instantiated for float and
// double.
template <typename acc_t>
cudaError_t launch_ridge_solve(const acc_t* gram, acc_t* work, acc_t* solution,
                               const acc_t* lam, int32_t* info, int64_t groups,
                               int64_t unknowns, int64_t out_per_group, int64_t pixels,
                               bool penalize_last, cudaStream_t stream);

// trace (groups, pixels) of ridge_inverse_trace; work (the size of gram) and scratch
// (groups, D, pixels) where ridge_factors_in_global_memory. Instantiated for float and double.
template <typename acc_t>
cudaError_t launch_ridge_inverse_trace(const acc_t* gram, acc_t* work, acc_t* scratch,
                                       const acc_t* lam, acc_t* trace, int32_t* info,
                                       int64_t groups, int64_t unknowns, int64_t pixels,
                                       bool penalize_last, cudaStream_t stream);

}  // namespace reggan_ext
