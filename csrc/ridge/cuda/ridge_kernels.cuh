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

// Factors gram (groups, D(D+1)/2, pixels), in scratch work of the same size where it takes
// one, and overwrites solution = cross (groups * out_per_group, D, pixels) with the solutions
// of ridge_solve; info (groups, pixels). Instantiated for float and double.
template <typename acc_t>
cudaError_t launch_ridge_solve(const acc_t* gram, acc_t* work, acc_t* solution,
                               const acc_t* lam, int32_t* info, int64_t groups,
                               int64_t unknowns, int64_t out_per_group, int64_t pixels,
                               bool penalize_last, cudaStream_t stream);

// trace (groups, pixels) of ridge_inverse_trace; work (the size of gram) and scratch
// (groups, D, pixels) as the kernels need them. Instantiated for float and double.
template <typename acc_t>
cudaError_t launch_ridge_inverse_trace(const acc_t* gram, acc_t* work, acc_t* scratch,
                                       const acc_t* lam, acc_t* trace, int32_t* info,
                                       int64_t groups, int64_t unknowns, int64_t pixels,
                                       bool penalize_last, cudaStream_t stream);

}  // namespace reggan_ext
