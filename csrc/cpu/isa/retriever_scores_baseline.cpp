// The retriever-scores kernels (forward and backward) compiled for ISA level baseline (isa.h).
#include "../prelude.h"
#include "../retriever_scores_problem.h"
#if 0 == 0 || defined(__x86_64__)
#define MPLUS_ISA baseline
#define MPLUS_ISA_LEVEL 0
#include "../isa_begin.h"
#include "../retriever_scores_impl.h"
#include "../isa_end.h"
#endif
