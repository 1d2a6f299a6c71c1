// One instantiation of the Hopper backward, compiled in parallel with the others.
#include "moda_bwd_launch.h"

namespace moda {
template std::string launch_bwd<cutlass::bfloat16_t, 64>(const BwdParams&, cudaStream_t);
}  // namespace moda
