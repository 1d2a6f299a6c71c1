// Host-side construction of TMA tensor maps (CUtensorMap) through the driver entry point,
// so the extension needs no link against libcuda.
//
// All maps here describe tiles of 64 elements along the contiguous head dimension, stored
// with the 128-byte swizzle that the wgmma K-major shared-memory layouts expect; the outer
// box dimensions select which rows a tile holds (see moda_tma_maps.h).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <string>

#include "driver_entry.h"

namespace moda {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn encode_tiled_fn() {
    static EncodeTiledFn fn = driver_function<EncodeTiledFn>("cuTensorMapEncodeTiled");
    return fn;
}

// A rank-N tensor map over `base` with `dims` (innermost first, in elements), `strides_bytes`
// for dims 1..N-1, and `box` (innermost first). Elements are 16-bit. Out-of-range elements
// read as zero. `promotion`: how much L2 fetches around each row the box reads (a row of 128
// bytes with 256-byte promotion also brings in its neighbour). Returns an error message, or
// an empty string.
template <int N>
std::string make_tensor_map(CUtensorMap* map, bool bf16, const void* base, std::array<uint64_t, N> dims,
                            std::array<uint64_t, N - 1> strides_bytes, std::array<uint32_t, N> box,
                            CUtensorMapL2promotion promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
    EncodeTiledFn encode = encode_tiled_fn();
    if (encode == nullptr) return "cuTensorMapEncodeTiled is not available from the CUDA driver";
    std::array<uint32_t, N> elem_strides;
    elem_strides.fill(1);
    CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, N,
                        const_cast<void*>(base), dims.data(), strides_bytes.data(), box.data(), elem_strides.data(),
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, promotion,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        std::string msg = "cuTensorMapEncodeTiled failed (error " + std::to_string(int(r)) + ") for dims [";
        for (int i = 0; i < N; ++i) msg += std::to_string(dims[i]) + (i + 1 < N ? ", " : "], box [");
        for (int i = 0; i < N; ++i) msg += std::to_string(box[i]) + (i + 1 < N ? ", " : "]");
        return msg;
    }
    return {};
}

}  // namespace moda
