// One instantiation of the Hopper backward (dK, dV, depth gradients), compiled in parallel with the others.
#include "moda_bwd_launch.h"

namespace moda {
template std::string launch_bwd_dkdv<cutlass::half_t, 128>(const BwdParams&, cudaStream_t);
}  // namespace moda
