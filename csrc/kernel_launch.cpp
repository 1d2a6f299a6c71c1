// Launching a kernel that Triton compiled, from C++, with only the tensors' addresses per call.
//
// Why: Triton's launcher, on every call, asks torch for the current device and stream from
// Python, calls data_ptr() on each tensor argument and asks the driver about each address
// (cuPointerGetAttribute). An eager decode call launches two kernels with eleven tensors
// between them, and that work was most of its host time (docs/performance.md, "Decoding").
//
// A KernelLaunch is built once per prepared layout (triton_ref/_launch.py) from the kernel
// Triton loaded: its CUfunction, grid, block and shared memory, and every parameter that is
// not a tensor already written in the kernel's ABI, one 8-byte slot each. A call writes the
// tensors' addresses into their slots and launches on the current stream of the current
// device, as Triton's launcher does. What the slots must hold (one per non-constexpr argument
// in signature order, then Triton's scratch pointers, null for kernels that need no scratch)
// is Triton's contract; the Python side builds them and refuses kernels it cannot describe.
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "driver_entry.h"

namespace {

using LaunchKernelExFn = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);

LaunchKernelExFn launch_kernel_fn() {
    static LaunchKernelExFn fn = moda::driver_function<LaunchKernelExFn>("cuLaunchKernelEx");
    return fn;
}

class KernelLaunch {
   public:
    static constexpr size_t kMaxSlots = 64;

    KernelLaunch(uint64_t function, std::array<uint32_t, 3> grid, uint32_t threads, uint32_t shared_bytes,
                 std::vector<uint64_t> slots, std::vector<int64_t> tensor_slots, bool pdl)
        : function_(reinterpret_cast<CUfunction>(function)),
          grid_(grid),
          threads_(threads),
          shared_bytes_(shared_bytes),
          slots_(std::move(slots)),
          tensor_slots_(std::move(tensor_slots)),
          pdl_(pdl) {
        TORCH_CHECK(launch_kernel_fn() != nullptr, "cuLaunchKernelEx is not available from the CUDA driver");
        TORCH_CHECK(slots_.size() <= kMaxSlots, "a kernel of ", slots_.size(), " parameters (at most ", kMaxSlots,
                    ")");
        for (int64_t s : tensor_slots_) {
            TORCH_CHECK(s >= 0 && static_cast<size_t>(s) < slots_.size(), "tensor slot ", s, " out of range");
        }
    }

    // Launches with `tensors` (one per tensor slot, in order) on the current stream.
    void operator()(const std::vector<at::Tensor>& tensors) const {
        TORCH_CHECK(tensors.size() == tensor_slots_.size(), "the kernel takes ", tensor_slots_.size(),
                    " tensors, got ", tensors.size());
        std::array<uint64_t, kMaxSlots> values;
        std::array<void*, kMaxSlots> params;
        for (size_t i = 0; i < slots_.size(); ++i) {
            values[i] = slots_[i];
            params[i] = &values[i];
        }
        for (size_t i = 0; i < tensors.size(); ++i) {
            values[tensor_slots_[i]] = reinterpret_cast<uint64_t>(tensors[i].data_ptr());
        }
        CUlaunchAttribute attr = {};
        attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        CUlaunchConfig config = {};
        config.gridDimX = grid_[0];
        config.gridDimY = grid_[1];
        config.gridDimZ = grid_[2];
        config.blockDimX = threads_;
        config.blockDimY = config.blockDimZ = 1;
        config.sharedMemBytes = shared_bytes_;
        config.hStream = c10::cuda::getCurrentCUDAStream().stream();
        config.attrs = &attr;
        config.numAttrs = pdl_ ? 1 : 0;
        CUresult r = launch_kernel_fn()(&config, function_, params.data(), nullptr);
        if (r == CUDA_ERROR_INVALID_CONTEXT) {  // a thread that has not used the runtime yet: bind its context
            cudaFree(nullptr);
            r = launch_kernel_fn()(&config, function_, params.data(), nullptr);
        }
        TORCH_CHECK(r == CUDA_SUCCESS, "cuLaunchKernelEx failed (error ", static_cast<int>(r), ")");
    }

   private:
    CUfunction function_;
    std::array<uint32_t, 3> grid_;
    uint32_t threads_;
    uint32_t shared_bytes_;
    std::vector<uint64_t> slots_;
    std::vector<int64_t> tensor_slots_;
    bool pdl_;  // a programmatic dependent launch: it may start before the previous kernel ends
};

}  // namespace

void bind_kernel_launch(pybind11::module_& m) {
    pybind11::class_<KernelLaunch>(m, "KernelLaunch",
                                   "A compiled Triton kernel with its non-tensor parameters bound: "
                                   "KernelLaunch(function, grid, threads, shared_bytes, slots, tensor_slots, pdl)(tensors)")
        .def(pybind11::init<uint64_t, std::array<uint32_t, 3>, uint32_t, uint32_t, std::vector<uint64_t>,
                            std::vector<int64_t>, bool>(),
             pybind11::arg("function"), pybind11::arg("grid"), pybind11::arg("threads"), pybind11::arg("shared_bytes"),
             pybind11::arg("slots"), pybind11::arg("tensor_slots"), pybind11::arg("pdl"))
        .def("__call__", &KernelLaunch::operator(), pybind11::arg("tensors"));
}
