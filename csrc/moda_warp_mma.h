// Warp-level building blocks of the per-position depth kernel (moda_bwd_depth_kernel.h):
// mma.sync on 16-bit operands with fp32 accumulators, their fragment layouts, ldmatrix, and
// 16-byte global stores.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

namespace moda {

// Warp-level mma.sync for one element type (fp32 accumulators), and packing two floats into
// the pair of elements that one operand register holds (lower column in the lower half).
template <class Element>
struct WarpMma {
    static constexpr bool kBf16 = std::is_same_v<Element, cutlass::bfloat16_t>;
    static_assert(kBf16 || std::is_same_v<Element, cutlass::half_t>, "16-bit floating-point operands");
    using K16 = std::conditional_t<kBf16, cute::SM80_16x8x16_F32BF16BF16F32_TN, cute::SM80_16x8x16_F32F16F16F32_TN>;
    using K8 = std::conditional_t<kBf16, cute::SM80_16x8x8_F32BF16BF16F32_TN, cute::SM80_16x8x8_F32F16F16F32_TN>;
    __device__ static uint32_t pack(float lo, float hi) {
        const cutlass::Array<Element, 2> pair =
            cutlass::NumericArrayConverter<Element, float, 2, cutlass::FloatRoundStyle::round_to_nearest>{}(
                cutlass::Array<float, 2>{{lo, hi}});
        return reinterpret_cast<const uint32_t&>(pair);
    }
};

// Eight elements, 16 bytes. Global stores are written as one 128-bit st.global: a plain copy of
// the array (or of a uint4 over it) is split into four 32-bit stores, and the cache-hint
// intrinsics (__stwb) become strong (ordered) stores.
template <class Element>
using Vec16 = cutlass::AlignedArray<Element, 8, 16>;
template <class Element>
__device__ __forceinline__ void store_16b(Element* dst, Vec16<Element> const& v) {
    const uint4 u = reinterpret_cast<uint4 const&>(v);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w));
}

// Fragment layouts (PTX ISA, mma.m16n8k16 / m16n8k8 with 16-bit operands), lane = 4 g + c:
//   C (16 x 8, fp32):   c[0], c[1] = C[g][2c], C[g][2c + 1];  c[2], c[3] = the same in row g + 8
//   A (16 x 16):        a[0] = A[g][2c, 2c + 1], a[1] = row g + 8, a[2] = columns + 8, a[3] = both
//   A (16 x 8):         a[0] = A[g][2c, 2c + 1], a[1] = row g + 8
//   B (16 x 8, by col): b[0] = B[2c, 2c + 1][g],  b[1] = rows + 8;   (8 x 8): b[0] only
// So a C tile, packed in pairs, is the A operand of the 16 x 8 product (P^T -> dV = P^T dO).
template <class Element>
__device__ __forceinline__ void mma_k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    WarpMma<Element>::K16::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2], c[3]);
}
template <class Element>
__device__ __forceinline__ void mma_k8(float (&c)[4], const uint32_t (&a)[2], uint32_t b) {
    WarpMma<Element>::K8::fma(c[0], c[1], c[2], c[3], a[0], a[1], b, c[0], c[1], c[2], c[3]);
}

// ldmatrix of four 8 x 8 blocks (x4), plain or transposed, and of two (x2); each lane passes
// the address of one block row (lanes 8 j .. 8 j + 7: block j).
template <class Element>
__device__ __forceinline__ void ldsm_x4(const Element* row, uint32_t (&r)[4]) {
    cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(row), r[0], r[1], r[2], r[3]);
}
template <class Element>
__device__ __forceinline__ void ldsm_x4_trans(const Element* row, uint32_t (&r)[4]) {
    cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(row), r[0], r[1], r[2], r[3]);
}
template <class Element>
__device__ __forceinline__ void ldsm_x2(const Element* row, uint32_t& r0, uint32_t& r1) {
    cute::SM75_U32x2_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(row), r0, r1);
}
// The 8 x 8 block of 16-bit pairs that a warp holds, transposed (movmatrix).
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
    uint32_t y;
    cute::SM75_U32x1_MOVM_T::copy(x, y);
    return y;
}

}  // namespace moda
