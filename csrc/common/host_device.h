// Lets one inline function serve both the C++ and the CUDA kernels. REGGAN_UNROLL asks nvcc
// to unroll a loop over a compile-time count (host compilers decide for themselves).
#pragma once

#ifdef __CUDACC__
#define REGGAN_HD __host__ __device__ __forceinline__
#define REGGAN_UNROLL _Pragma("unroll")
#else
#define REGGAN_HD inline
#define REGGAN_UNROLL
#endif
