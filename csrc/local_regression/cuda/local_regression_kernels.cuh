// Launchers of the CUDA local_regression kernels. Plain CUDA runtime types and raw pointers, no
// torch headers: the kernels compile with nvcc alone, and the torch glue
// (local_regression_cuda.cpp) calls them. Instantiated for float, double, __half and
// __nv_bfloat16. Every tensor is contiguous in the layout of local_regression_math.h; each
// launcher enqueues on `stream` and returns the launch's error code.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "local_regression/local_regression_elementwise.h"
#include "local_regression/local_regression_math.h"

namespace reggan_ext {

// output (N, C_out, H_out, W_out) from input (N, C_in, H, W), weight
// (C_out, C_in/groups, kH, kW, H_out, W_out) and bias (C_out, H_out, W_out) or nullptr.
template <typename scalar_t>
cudaError_t launch_local_regression_forward(const scalar_t* input, const scalar_t* weight,
                                            const scalar_t* bias, scalar_t* output,
                                            const LocalGeometry& g, cudaStream_t stream);

// grad_input (N, C_in, H, W) from grad_output and weight.
template <typename scalar_t>
cudaError_t launch_local_regression_backward_input(const scalar_t* grad_output,
                                                   const scalar_t* weight, scalar_t* grad_input,
                                                   const LocalGeometry& g, cudaStream_t stream);

// Elements of the workspace launch_local_regression_backward_weight needs for g, in the
// kernels' accumulation type (acc_type: float, or double for double): 0, or the partial sums
// of a batch split across threads, several times grad_weight's size.
cudaError_t local_regression_backward_weight_workspace(const LocalGeometry& g,
                                                      int64_t* elements);

// grad_weight (C_out, C_in/groups, kH, kW, H_out, W_out) from grad_output and input; writes
// zeros when the batch is empty. workspace: local_regression_backward_weight_workspace(g)
// elements, or nullptr when that is 0.
template <typename scalar_t>
cudaError_t launch_local_regression_backward_weight(const scalar_t* grad_output,
                                                    const scalar_t* input, scalar_t* grad_weight,
                                                    acc_type<scalar_t>* workspace,
                                                    const LocalGeometry& g, cudaStream_t stream);

}  // namespace reggan_ext
