// One instantiation of the Hopper forward; each lives in its own file so they compile in parallel.
#include "moda_fwd_launch.h"

namespace moda {
template std::string launch_fwd<cutlass::bfloat16_t, 64>(const FwdParams&, cudaStream_t);
}  // namespace moda
