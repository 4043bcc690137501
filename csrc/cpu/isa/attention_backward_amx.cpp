// The attention backward kernel compiled for ISA level amx (isa.h).
#include "../prelude.h"
#include "../attention_backward_problem.h"
#if 4 == 0 || defined(__x86_64__)
#define MPLUS_ISA amx
#define MPLUS_ISA_LEVEL 4
#include "../isa_begin.h"
#include "../attention_backward_impl.h"
#include "../isa_end.h"
#endif
