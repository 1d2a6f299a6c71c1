// Named barriers of the backward's key-stationary kernel (moda_bwd_kernel.h), the only ones
// of the Hopper kernels (the forward and the dQ kernel synchronize through their pipelines'
// mbarriers alone). Ids are user ids: CUTLASS's NamedBarrier offsets them past its reserved ones.
#pragma once

#include <cstdint>

namespace moda {

// Fused dQ: both consumer warpgroups' halves of a step's dS are in shared memory (id 0).
constexpr uint32_t kDsReadyBarrier = 0;
// Fused dQ split by keys (kDqOwnKeys): warpgroup w's own half of dS is in shared memory (ids 1 + w).
constexpr uint32_t kOwnDsReadyBarrier = 1;

}  // namespace moda
