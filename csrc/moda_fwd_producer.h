// The producer of the query-stationary kernels (the forward, the backward's dQ kernel):
// thread 0 of warpgroup 0 streams a CTA's key tiles into the K and V pipelines.
#pragma once

#include <cuda.h>

#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "moda_fwd_kernel_params.h"
#include "moda_fwd_tile_scheduler.h"
#include "moda_sm90_common.h"

namespace moda {

// Each tile of the schedule into the K pipeline's and the V pipeline's next stage: a sequence
// box [64, 1, kBlockN, 1, 1] at position n * kBlockN, or a depth box [64, 1, Lb, Tb, 1] at
// slot l0, position s0. Both kinds go through the same two pipelines (K, then V: V is needed
// later than K), so the consumers see a single stream of [kBlockN x D] tiles whatever their
// source. Run by thread 0 alone.
template <int kBlockN, int kHeadDim, class Pipeline, class Element>
__device__ __forceinline__ void produce_key_tiles(FwdKernelParams const& p, TileSchedule const& sched,
                                                  Pipeline& pipe_k, Pipeline& pipe_v, Element* sK, Element* sV,
                                                  int hk, int batch) {
    if (p.has_seq) {
        prefetch_tma_descriptor(&p.tma_k);
        prefetch_tma_descriptor(&p.tma_v);
    }
    if (p.depth > 0) {
        prefetch_tma_descriptor(&p.tma_dk);
        prefetch_tma_descriptor(&p.tma_dv);
    }
    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (int i = 0; i < sched.size(); ++i) {
        const int stage_offset = write.index() * kBlockN * kHeadDim;
        const TileAt tile(p, sched, i);
        auto load = [&](Pipeline& pipe, CUtensorMap const* seq_map, CUtensorMap const* depth_map, Element* buf) {
            pipe.producer_acquire(write);  // arrives on the stage's "full" barrier with its byte count
            uint64_t* full = pipe.producer_get_barrier(write);
            if (tile.is_seq) {
                tma_load_rows<kBlockN, kHeadDim>(seq_map, full, buf + stage_offset, hk, tile.n * kBlockN, batch, 0);
            } else {
                tma_load_rows<kBlockN, kHeadDim>(depth_map, full, buf + stage_offset, hk, tile.l0, tile.s0, batch);
            }
        };
        load(pipe_k, &p.tma_k, &p.tma_dk, sK);
        load(pipe_v, &p.tma_v, &p.tma_dv, sV);
        ++write;
    }
}

}  // namespace moda
