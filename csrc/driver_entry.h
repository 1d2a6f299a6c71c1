// CUDA driver functions through the runtime's entry-point query, so the extension needs no
// link against libcuda (the driver is whatever the process has loaded).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

namespace moda {

// The driver function `name` (as of the CUDA 12.0 driver API), or nullptr where the driver lacks it.
template <typename Fn>
Fn driver_function(const char* name) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion(name, &ptr, 12000, cudaEnableDefault, &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
        return nullptr;
    }
    return reinterpret_cast<Fn>(ptr);
}

}  // namespace moda
