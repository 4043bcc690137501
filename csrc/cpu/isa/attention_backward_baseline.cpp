// The attention backward kernel compiled for ISA level baseline (isa.h).
#include "../prelude.h"
#include "../attention_backward_problem.h"
#if 0 == 0 || defined(__x86_64__)
#define MPLUS_ISA baseline
#define MPLUS_ISA_LEVEL 0
#include "../isa_begin.h"
#include "../attention_backward_impl.h"
#include "../isa_end.h"
#endif
