// The attention backward kernel compiled for ISA level avx512_bf16 (isa.h).
#include "../prelude.h"
#include "../attention_backward_problem.h"
#if 3 == 0 || defined(__x86_64__)
#define MPLUS_ISA avx512_bf16
#define MPLUS_ISA_LEVEL 3
#include "../isa_begin.h"
#include "../attention_backward_impl.h"
#include "../isa_end.h"
#endif
