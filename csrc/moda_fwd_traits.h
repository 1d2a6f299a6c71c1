// Compile-time shape of the Hopper MoDA forward: tiles, warpgroups, shared-memory layouts,
// the two wgmma tilings. Layouts are CuTe types, so the TMA boxes, the wgmma descriptors and
// the register fragments all derive from the same definitions.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <type_traits>

namespace moda {

using namespace cute;

template <class Element_, int kHeadDim_, int kBlockN_, int kStages_, int kConsumerWGs_ = 2,
          int kDepthPrefetch_ = 0, bool kSwapDepth_ = false, bool kDepthLoop_ = false, bool kLatePvWait_ = false,
          int kDepthL2Lead_ = 0>
struct FwdTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kConsumerWGs = kConsumerWGs_;  // 2, or 3 (more warps to hide the softmax's latency)
    static constexpr int kBlockM = 64 * kConsumerWGs;   // G-folded query rows per CTA: 64 per consumer warpgroup
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kStages = kStages_;
    static constexpr int kDepthPrefetch = kDepthPrefetch_;  // depth tiles asked of L2 this far ahead (0: none)
    static constexpr bool kSwapDepth = kSwapDepth_;         // operand-swapped depth tiles (see below)
    static constexpr bool kDepthLoop = kDepthLoop_;         // depth tiles in a sparse loop of their own
    static constexpr bool kLatePvWait = kLatePvWait_;       // the P V wait pinned after the softmax
    static constexpr int kDepthL2Lead = kDepthL2Lead_;      // depth boxes to L2 over the last W sequence tiles
    static_assert(!(kSwapDepth && kDepthLoop), "kSwapDepth and kDepthLoop are two ways to run the depth tiles");
    static constexpr int kThreads = 128 * (1 + kConsumerWGs);  // warpgroup 0 produces
    // Register split (setmaxnreg): the producer needs few, the consumers hold S, P and O. The
    // 64K registers of the SM shared out in multiples of 8, at most 240 each (2 warpgroups:
    // 240, 3: 160).
    // The producer warp's L2 prefetches (kDepthL2Lead) need 32. The consumers' setmaxnreg.inc
    // waits for the registers the producer frees; with two consumer warpgroups a CTA starts
    // with 168 a thread, and 24 is what leaves 240 for each consumer (32 hangs the kernel).
    static constexpr int kProducerRegs = kDepthL2Lead > 0 ? 32 : 24;
    static_assert(kDepthL2Lead == 0 || kConsumerWGs == 3,
                  "kDepthL2Lead needs 32 producer registers: with two consumer warpgroups at 240 that is more "
                  "than the 168 a thread a 384-thread CTA starts with");
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

    // Depth tiles on the warp-level path (FwdConfig::kWarpDepth): each warp multiplies only its
    // own 16 rows, with mma.sync, operands read from the same swizzled tiles by ldmatrix. An
    // m16n8 accumulator holds, per thread, the same rows and columns in the same register order
    // as the warp's share of a wgmma accumulator, so the online softmax runs unchanged on it.
    using WarpMmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>,
                                           SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
    using WarpMma = decltype(make_tiled_mma(WarpMmaAtom{}, Layout<Shape<_1, _1, _1>>{}, Tile<_16, _16, _16>{}));
    using WarpLoadK = Copy_Atom<SM75_U32x4_LDSM_N, Element>;  // K-major rows: Q and K
    using WarpLoadT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // transposed: V^T

    // K-major, 128-byte swizzled tiles: 64-column blocks of rows 128 bytes long, the layout a
    // TMA box [rows x 64] with SWIZZLE_128B writes.
    using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
    using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
    // V^T: the same bytes as V, indexed (d, n, stage).
    using SmemLayoutVt = decltype(composition(
        SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{})));

    // Operand-swapped depth tiles (FwdConfig::kSwapDepth; depth_chunk = 1 only): a depth box's
    // kBlockN slot rows are the M side and a block of kSwapRows query rows the N side, so the
    // products are S^T = K_box Q_rows^T and O^T = V_box^T P^T. A query row sees only its own
    // position's slots, so a block wastes only the products of a row with another position's
    // slots: at L = 64, G = 8 it keeps 1/2 of them, where the dense tile [64 rows x kBlockN]
    // keeps 1/8.
    static constexpr int kSwapRows = 16;
    using TiledMmaSwapS = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSwapRows>, Int<kHeadDim>>>()));
    using TiledMmaSwapO = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSwapRows>, Int<kBlockN>>, GMMA::Major::MN,
                             GMMA::Major::K>()));
    using SmemLayoutPt = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kSwapRows>, Int<kBlockN>>{}));  // P^T, K-major
    static constexpr int kSwapOStride = kHeadDim + 4;  // O^T rows padded: conflict-free column writes
    // One consumer warpgroup's scratch: P^T for the second product, then (once that product is
    // done) O^T handed from the swapped layout to the rows' owners; the per-warp column
    // maxima and sums of the scores, double-buffered: a block's maxima are written before its
    // first barrier, while the owning warp may still read the previous block's.
    struct SwapStorage {
        static constexpr int kBytes = cute::max(int(cosize_v<SmemLayoutPt> * sizeof(Element)),
                                                int(kSwapRows * kSwapOStride * sizeof(float)));
        alignas(1024) char pt_or_o[kBytes];
        float col_max[2][4][kSwapRows];
        float col_sum[2][4][kSwapRows];
    };
    struct NoSwapStorage {};

    using Pipeline = cutlass::PipelineTmaAsync<kStages>;

    struct SharedStorage {
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
        typename Pipeline::SharedStorage pipe_k;
        typename Pipeline::SharedStorage pipe_v;
        alignas(8) uint64_t q_full;
        std::conditional_t<kSwapDepth, SwapStorage[kConsumerWGs], NoSwapStorage> swap;
    };

    static constexpr int kTileBytes = kBlockN * kHeadDim * int(sizeof(Element));  // one K or V stage
    static constexpr int kQBytes = kBlockM * kHeadDim * int(sizeof(Element));
};

}  // namespace moda
