// Where the two halves of one softmax meet when the forward's depth part runs in a kernel of
// its own beside the sequence kernel (FwdConfig::kDepthBeside).
//
// The unit is one query block of the sequence kernel: kBlockM G-folded rows, i.e. a range of
// positions with all G heads of one kv head. Each kernel computes its half of a block (the
// softmax over its own keys: normalized output and lse), then claims the block with an
// atomic increment:
//   - the depth kernel writes its half to the workspace BEFORE it claims;
//   - the sequence kernel claims first. If the depth half is there (the claim counted one
//     before it), it merges in registers and writes the output. Else it writes its own half to
//     the workspace and raises the block's ready flag;
//   - a depth kernel that claims second waits for that flag (the sequence CTA that claimed is
//     running and only stores before raising it) and merges both halves from the workspace.
// Nobody waits for a kernel that has not claimed the block, so no CTA ever waits for one
// that may not be resident: the kernels need not run at the same time to be correct.
//
// The merge is the same arithmetic on the same fp32 values in both places (merge_weights,
// merge_value), so the output does not depend on which kernel finished first.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moda {

struct FwdMergeParams {
    int* claims;        // [blocks], zero before the call
    int* ready;         // [blocks], zero before the call
    float* depth_out;   // [B, T, Hq, D] the depth half, normalized
    float* depth_lse;   // [B, Hq, T] natural log
    float* seq_out;     // the sequence half, where the sequence kernel finished first
    float* seq_lse;
};

// Block index of the sequence kernel's CTA (m, hk, batch) = (blockIdx.x, y, z): the order in
// which its CTAs start, which the depth kernel follows.
__device__ __forceinline__ int merge_block_index(int x, int hk, int batch, int kv_heads, int num_m_blocks) {
    return (batch * kv_heads + hk) * num_m_blocks + x;
}

// A named barrier of `threads` threads (ids chosen by the caller, clear of CUTLASS's).
__device__ __forceinline__ void merge_sync(uint32_t id, uint32_t threads) {
    asm volatile("barrier.cta.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// The same barrier, returning whether any participant passed true.
__device__ __forceinline__ bool merge_sync_or(uint32_t id, uint32_t threads, bool pred) {
    uint32_t any;
    asm volatile(
        "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbarrier.cta.red.or.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
        : "=r"(any)
        : "r"(uint32_t(pred)), "r"(id), "r"(threads)
        : "memory");
    return any != 0;
}

// Claim block `blk` for the `threads` threads of barrier `id` (one of them the leader).
// Returns true when the other kernel claimed it before.
__device__ __forceinline__ bool merge_claim(FwdMergeParams const& m, int blk, bool leader, uint32_t id,
                                            uint32_t threads) {
    merge_sync(id, threads);  // every participant is done with its half
    int before = 0;
    if (leader) {
        before = atomicAdd(&m.claims[blk], 1);
        __threadfence();
    }
    return merge_sync_or(id, threads, before != 0);
}

// After writing the sequence half to the workspace: raise the block's ready flag.
__device__ __forceinline__ void merge_publish(FwdMergeParams const& m, int blk, bool leader, uint32_t id,
                                              uint32_t threads) {
    __threadfence();
    merge_sync(id, threads);
    if (leader) atomicExch(&m.ready[blk], 1);
}

// Wait until the sequence half of block `blk` is in the workspace.
__device__ __forceinline__ void merge_wait_ready(FwdMergeParams const& m, int blk, bool leader, uint32_t id,
                                                 uint32_t threads) {
    if (leader) {
        int flag = 0;
        for (;;) {
            asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(flag) : "l"(m.ready + blk) : "memory");
            if (flag != 0) break;
            __nanosleep(100);
        }
    }
    merge_sync(id, threads);
}

// Weights of the two halves (natural-log lse; the depth half always saw at least one row),
// and the merged lse.
struct MergeWeights {
    float seq, depth, lse;
};
__device__ __forceinline__ MergeWeights merge_weights(float seq_lse, float depth_lse) {
    const float top = fmaxf(seq_lse, depth_lse);
    const float ws = seq_lse == -INFINITY ? 0.f : __expf(seq_lse - top);
    const float wd = __expf(depth_lse - top);
    const float sum = __fadd_rn(ws, wd);
    return {__fdiv_rn(ws, sum), __fdiv_rn(wd, sum), __fadd_rn(top, __logf(sum))};
}
__device__ __forceinline__ float merge_value(float seq_out, float depth_out, MergeWeights const& w) {
    return __fadd_rn(__fmul_rn(seq_out, w.seq), __fmul_rn(depth_out, w.depth));
}

}  // namespace moda
