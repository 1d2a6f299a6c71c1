// Compile-time shape of the Hopper MoDA backward (dK, dV and the depth gradients): tiles,
// warpgroups, shared-memory layouts and the two wgmma tilings, as CuTe types.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace moda {

using namespace cute;

// G-folded query rows per step of the key-stationary kernel; also the block of its row
// statistics (lse, delta) that the preprocess lays out for one bulk copy per step.
constexpr int kBwdStepRows = 64;
// Steps over the T * G folded rows of one (batch, kv head).
inline int bwd_row_steps(int seqlen, int group) { return (seqlen * group + kBwdStepRows - 1) / kBwdStepRows; }

template <class Element_, int kHeadDim_, int kStages_, bool kOverlapSteps_, bool kFusedDq_, int kKVBuffers_,
          bool kDqOwnKeys_>
struct BwdTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockN = 128;  // keys (sequence keys or one depth box) per CTA: 64 per consumer warpgroup
    static constexpr int kBlockM = kBwdStepRows;  // G-folded query rows per step
    static constexpr int kStages = kStages_;
    static constexpr int kConsumerWGs = 2;
    static constexpr int kThreads = 128 * (1 + kConsumerWGs);  // warpgroup 0 produces
    static constexpr int kProducerRegs = 24;
    static constexpr int kConsumerRegs = 240;
    // Leave a step's dV / dK running while the next step's S / dP are issued (BwdConfig).
    static constexpr bool kOverlapSteps = kOverlapSteps_;
    // Also compute dQ: each step's dS goes to shared memory and dQ_step = dS K is added into
    // an fp32 buffer with vector atomics (not deterministic: the order of the additions varies).
    static constexpr bool kFusedDq = kFusedDq_;
    // Fused dQ split by keys: each consumer warpgroup multiplies only its own 64 keys' dS by
    // their K, for all D columns, and adds that (twice the atomics); no barrier between the
    // warpgroups. Otherwise they split the head dim and read each other's dS.
    static constexpr bool kDqOwnKeys = kFusedDq && kDqOwnKeys_;
    static_assert(kHeadDim % 64 == 0, "TMA boxes span 64 head-dim elements (the 128-byte swizzle width)");

    // Keys are the M dimension: S^T = K Q^T and dP^T = V dO^T with both operands in shared
    // memory; then dV += P^T dO and dK += dS^T Q with P^T / dS^T from registers and dO / Q
    // read transposed (MN-major). The G heads of a kv head are columns of the same tiles, so
    // their contributions to dK and dV add up inside the K dimension of those products.
    using AtomLayoutMNK = Layout<Shape<Int<kConsumerWGs>, _1, _1>>;
    using TiledMmaSdP = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kHeadDim>>>(), AtomLayoutMNK{}));
    using TiledMmaKV = decltype(make_tiled_mma(
        GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                             GMMA::Major::MN>(),
        AtomLayoutMNK{}));

    // dQ = dS K for the fused dQ: the step's rows as M, keys as K. dS is read from shared
    // memory row-major in M (written there from S^T's registers, whose adjacent columns are
    // adjacent rows), K MN-major as in dK. The consumer warpgroups split the head dim (N), or
    // with kDqOwnKeys each takes all of it over its own keys.
    static constexpr int kDqKeys = kDqOwnKeys ? kBlockN / kConsumerWGs : kBlockN;  // K of one warpgroup's product
    using TiledMmaDq = decltype(make_tiled_mma(
        GMMA::ss_op_selector<Element, Element, float,
                             Shape<Int<kBlockM>, Int<kDqOwnKeys ? kHeadDim : kHeadDim / kConsumerWGs>, Int<kDqKeys>>,
                             GMMA::Major::MN, GMMA::Major::MN>(),
        Layout<Shape<_1, Int<kDqOwnKeys ? 1 : kConsumerWGs>, _1>>{}));

    using SmemAtom = GMMA::Layout_K_SW128_Atom<Element>;
    // K and V in kKVBuffers buffers: a CTA that walks several depth boxes loads the next
    // boxes' keys (from DRAM: no other CTA reads them) while it works on the current one.
    static constexpr int kKVBuffers = kKVBuffers_;
    using SmemLayoutKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kKVBuffers>>{}));
    using SmemLayoutQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
    // Q^T and dO^T: the same bytes, indexed (d, row, stage).
    using SmemLayoutQt = decltype(composition(
        SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{}, Step<_2, _1, _3>{})));

    // K^T: the same bytes as K, indexed (d, key, buffer), for dQ = dS K.
    using SmemLayoutKt = decltype(composition(
        SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kKVBuffers>>{}, Step<_2, _1, _3>{})));
    // dS of a step (rows, keys), two buffers: a warpgroup writes the next step's while the
    // other may still read this one's. dS^T: the same bytes indexed (key, row, buffer).
    static constexpr int kDsBuffers = 2;
    using SmemLayoutDs = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                                Shape<Int<kBlockM>, Int<kBlockN>, Int<kDsBuffers>>{}));
    using SmemLayoutDst = decltype(composition(
        SmemLayoutDs{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, Int<kDsBuffers>>{}, Step<_2, _1, _3>{})));

    using Pipeline = cutlass::PipelineTmaAsync<kStages>;

    struct SharedStorage {
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> k;
        cute::array_aligned<Element, cosize_v<SmemLayoutKV>, 1024> v;
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
        cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> dout;
        // Per stage, the step's rows' log2-scaled lse then delta (a bulk copy beside Q and dO).
        cute::array_aligned<float, kStages * 2 * kBlockM, 128> row_stats;
        cute::array_aligned<Element, kFusedDq ? cosize_v<SmemLayoutDs> : 0, 1024> ds;  // fused dQ only
        typename Pipeline::SharedStorage pipe;
        alignas(8) uint64_t kv_full[kKVBuffers];   // TMA of a buffer's K and V done
        alignas(8) uint64_t kv_empty[kKVBuffers];  // every consumer thread done reading it
    };

    static constexpr int kRowStatsBytes = 2 * kBlockM * int(sizeof(float));
    static constexpr int kStepBytes = 2 * kBlockM * kHeadDim * int(sizeof(Element)) + kRowStatsBytes;  // Q, dO, stats
    static constexpr int kKVBytes = 2 * kBlockN * kHeadDim * int(sizeof(Element));  // one buffer of K and V
};

}  // namespace moda
