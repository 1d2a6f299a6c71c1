// Compile-time shape of the Hopper MoDA forward: tiles, warpgroups and their register split,
// shared-memory layouts, the two wgmma tilings. Layouts are CuTe types, so the TMA boxes, the
// wgmma descriptors and the register fragments all derive from the same definitions.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace moda {

using namespace cute;

template <class Element_, int kHeadDim_, int kBlockN_, int kStages_, int kConsumerWGs_>
struct FwdTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kConsumerWGs = kConsumerWGs_;  // 2, or 3 (more warps to hide the softmax's latency)
    static constexpr int kBlockM = 64 * kConsumerWGs;   // G-folded query rows per CTA: 64 per consumer warpgroup
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kStages = kStages_;
    static constexpr int kThreads = 128 * (1 + kConsumerWGs);  // warpgroup 0 produces
    // Register split (setmaxnreg): the producer needs few, the consumers hold S, P and O. The
    // 64K registers of the SM shared out in multiples of 8, at most 240 each (2 warpgroups:
    // 240, 3: 160). The consumers' setmaxnreg.inc waits for the registers the producer frees;
    // with two consumer warpgroups a CTA starts with 168 a thread, and 24 is what leaves 240
    // for each consumer (32 hangs the kernel).
    static constexpr int kProducerRegs = 24;
    static constexpr int kConsumerRegs =
        cute::min(240, (65536 / 128 - kProducerRegs) / kConsumerWGs / 8 * 8);
    static_assert(kConsumerWGs == 2 || kConsumerWGs == 3, "two or three consumer warpgroups");
    static_assert(kHeadDim % 64 == 0, "TMA boxes span 64 head-dim elements (the 128-byte swizzle width)");

    // Each consumer warpgroup computes 64 rows: S = Q K^T from shared memory, O += P V with P
    // in registers and V read transposed (MN-major) from shared memory.
    using AtomLayoutMNK = Layout<Shape<Int<kConsumerWGs>, _1, _1>>;
    using TiledMmaQK = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), AtomLayoutMNK{}));
    using TiledMmaPV = decltype(make_tiled_mma(
        GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                             GMMA::Major::MN>(),
        AtomLayoutMNK{}));

    // K-major, 128-byte swizzled tiles: 64-column blocks of rows 128 bytes long, the layout a
    // TMA box [rows x 64] with SWIZZLE_128B writes.
    using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
    using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
    // V^T: the same bytes as V, indexed (d, n, stage).
    using SmemLayoutVt = decltype(composition(
        SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

    using Pipeline = cutlass::PipelineTmaAsync<kStages>;

    struct SharedStorage {
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
        typename Pipeline::SharedStorage pipe_k;
        typename Pipeline::SharedStorage pipe_v;
        alignas(8) uint64_t q_full;
    };

    static constexpr int kTileBytes = kBlockN * kHeadDim * int(sizeof(Element));  // one K or V stage
    static constexpr int kQBytes = kBlockM * kHeadDim * int(sizeof(Element));
};

}  // namespace moda
