// Portability macros shared by host (C++) and device (CUDA) code. Torch-free.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HD __host__ __device__
#define FL_INLINE __forceinline__
#else
#define FL_HD
#define FL_INLINE inline
#endif
