// Every library header the ISA-generic kernel sources (vec.h, *_kernels.h, *_impl.h) use. The files in isa/
// include this before isa_begin.h, so all of it is compiled for the baseline; the kernel sources themselves include
// no library header (one first included inside the ISA region would be compiled for that level).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <ATen/native/CPUBlas.h>  // cpublas::brgemm, the amx level's products (bf16_gemm.h)
#include <immintrin.h>
#endif
