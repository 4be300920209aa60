// Lets one inline function serve both the C++ and the CUDA kernels.
#pragma once

#ifdef __CUDACC__
#define REGGAN_HD __host__ __device__ __forceinline__
#else
#define REGGAN_HD inline
#endif
