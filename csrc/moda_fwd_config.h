// The Hopper forward's compile-time choices per head dim (FwdConfig). No kernel code: the
// host entry point reads it too.
#pragma once

namespace moda {

// Tile sizes and warpgroups per head dim: kBlockN keys per stage, kStages stages (shared
// memory: q + 2 x kStages x [kBlockN x D], at most 227 KB); kConsumerWGs: 64-row consumer
// warpgroups per CTA (3: 192-row CTAs, a third warp per scheduler to hide the softmax's
// latency, 160 registers each).
// Chosen by measurement (docs/experiments.md), H200, forward of the three benchmark shapes. D = 64: three
// warpgroups: 5.34 ms at T = 16384 against 5.83 with two; six stages (the most that fit):
// 0.499 against 0.528 ms at T = 4096, 5.32 against 5.38 at T = 16384, the same without
// depth: a CTA's depth boxes come from DRAM, and more of them in flight hide more of that
// latency (four stages: 1-2%). D = 128: two warpgroups, a third stage (the most that fit;
// 1% faster).
template <int D> struct FwdConfig;
template <> struct FwdConfig<64> {
    static constexpr int kBlockN = 128, kStages = 6;
    static constexpr int kConsumerWGs = 3;
};
template <> struct FwdConfig<128> {
    static constexpr int kBlockN = 128, kStages = 3;
    static constexpr int kConsumerWGs = 2;
};

}  // namespace moda
