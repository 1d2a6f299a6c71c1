// Packed documents: several documents back to back in the time axis of batch 1, each position
// carrying its document's bounds (moda_params.h). Without them every position's document is
// the whole sequence, so the same arithmetic serves both.
#pragma once

namespace moda {

// The positions [start, end) of the document that holds position t. Positions past T (padding
// rows of the last block) take the last position's document.
struct Document {
    int start, end;
    __device__ static Document at(const int* starts, const int* ends, int seqlen, int t) {
        if (starts == nullptr) return {0, seqlen};
        t = min(t, seqlen - 1);
        return {__ldg(starts + t), __ldg(ends + t)};
    }
    // The first position of the depth chunk of position t: chunks of `chunk` positions counted
    // from the document's start.
    __device__ int chunk_start(int t, int chunk) const { return start + (t - start) / chunk * chunk; }
};

}  // namespace moda
