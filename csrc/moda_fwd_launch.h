// Host side of the Hopper forward: parameters, grid, shared memory, launch. Included by the
// instantiation files (one element type and head dim each, compiled in parallel).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "moda_fwd_config.h"
#include "moda_fwd_kernel.h"
#include "moda_fwd_kernel_params.h"
#include "moda_fwd_traits.h"
#include "moda_params.h"

namespace moda {

template <class Element, int D>
std::string launch_fwd(const FwdParams& a, cudaStream_t stream) {
    using Config = FwdConfig<D>;
    using Traits = FwdTraits<Element, D, Config::kBlockN, Config::kStages, Config::kConsumerWGs>;
    static_assert(sizeof(typename Traits::SharedStorage) <= 227 * 1024,
                  "shared memory over the 227 KB an SM90 CTA may have: fewer stages");
    FwdKernelParams p{};
    const std::string err = make_fwd_kernel_params(a, Traits::kBlockM, Traits::kBlockN, p);
    if (!err.empty()) return err;

    const size_t smem = sizeof(typename Traits::SharedStorage);
    auto kernel = a.causal ? &moda_fwd_kernel<Traits, true> : &moda_fwd_kernel<Traits, false>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e);
    const dim3 grid(p.num_m_blocks, a.kv_heads, a.batch);
    kernel<<<grid, Traits::kThreads, smem, stream>>>(p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return std::string("kernel launch: ") + cudaGetErrorString(e);
    return {};
}

}  // namespace moda
