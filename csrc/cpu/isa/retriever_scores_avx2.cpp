// The retriever-scores kernels (forward and backward) compiled for ISA level avx2 (isa.h).
#include "../prelude.h"
#include "../retriever_scores_problem.h"
#if 1 == 0 || defined(__x86_64__)
#define MPLUS_ISA avx2
#define MPLUS_ISA_LEVEL 1
#include "../isa_begin.h"
#include "../retriever_scores_impl.h"
#include "../isa_end.h"
#endif
