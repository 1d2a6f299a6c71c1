// Python binding of the CUDA kernels: checks torch tensors, fills the plain parameter
// structs, launches on the current stream. The kernels never see a torch type.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "moda_params.h"

#ifndef MODA_COMPILED_ARCHS
#define MODA_COMPILED_ARCHS "sm_90a"
#endif

namespace {

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t dim) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), " but q has ",
                q.scalar_type());
    TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
    TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// The forward's problem description from its tensors (checked); shared by fwd and bwd.
moda::FwdParams make_fwd_params(const at::Tensor& q, const std::optional<at::Tensor>& k,
                                const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& depth_k,
                                const std::optional<at::Tensor>& depth_v, const at::Tensor& out, const at::Tensor& lse,
                                double scale, bool causal, int64_t depth_chunk,
                                const std::optional<at::Tensor>& doc_start, const std::optional<at::Tensor>& doc_end) {
    check_tensor(q, "q", q, 4);
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                "the CUDA kernel takes float16 or bfloat16, got ", q.scalar_type());
    TORCH_CHECK(k.has_value() == v.has_value(), "k and v must be given together");
    TORCH_CHECK(depth_k.has_value() == depth_v.has_value(), "depth_k and depth_v must be given together");
    check_tensor(out, "out", q, 4);
    TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
    TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat && lse.is_contiguous(),
                "lse must be a contiguous float32 CUDA tensor");

    moda::FwdParams p{};
    p.dtype = q.scalar_type() == at::kBFloat16 ? moda::DType::kBFloat16 : moda::DType::kFloat16;
    p.batch = q.size(0);
    p.seqlen = q.size(1);
    p.q_heads = q.size(2);
    p.head_dim = q.size(3);
    p.causal = causal;
    p.depth_chunk = depth_chunk;
    p.scale = static_cast<float>(scale);
    p.q = q.data_ptr();
    p.q_batch_stride = q.stride(0);
    p.q_seq_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.out = out.data_ptr();
    p.out_batch_stride = out.stride(0);
    p.out_seq_stride = out.stride(1);
    p.out_head_stride = out.stride(2);
    p.lse = lse.data_ptr<float>();
    TORCH_CHECK(lse.numel() == q.size(0) * q.size(2) * q.size(1), "lse must have shape [B, Hq, T]");

    p.has_seq = k.has_value();
    if (p.has_seq) {
        check_tensor(*k, "k", q, 4);
        check_tensor(*v, "v", q, 4);
        TORCH_CHECK(k->sizes() == v->sizes(), "k and v must have the same shape");
        p.kv_heads = k->size(2);
        p.k = k->data_ptr();
        p.v = v->data_ptr();
        p.k_batch_stride = k->stride(0), p.k_seq_stride = k->stride(1), p.k_head_stride = k->stride(2);
        p.v_batch_stride = v->stride(0), p.v_seq_stride = v->stride(1), p.v_head_stride = v->stride(2);
    }
    if (depth_k.has_value()) {
        check_tensor(*depth_k, "depth_k", q, 5);
        check_tensor(*depth_v, "depth_v", q, 5);
        TORCH_CHECK(depth_k->sizes() == depth_v->sizes(), "depth_k and depth_v must have the same shape");
        p.kv_heads = depth_k->size(3);
        p.depth = depth_k->size(2);
        if (p.depth > 0) {
            p.depth_k = depth_k->data_ptr();
            p.depth_v = depth_v->data_ptr();
        }
        p.dk_batch_stride = depth_k->stride(0), p.dk_seq_stride = depth_k->stride(1);
        p.dk_slot_stride = depth_k->stride(2), p.dk_head_stride = depth_k->stride(3);
        p.dv_batch_stride = depth_v->stride(0), p.dv_seq_stride = depth_v->stride(1);
        p.dv_slot_stride = depth_v->stride(2), p.dv_head_stride = depth_v->stride(3);
    }
    TORCH_CHECK(p.has_seq || depth_k.has_value(), "give k/v, depth_k/depth_v, or both");
    TORCH_CHECK(doc_start.has_value() == doc_end.has_value(), "doc_start and doc_end must be given together");
    if (doc_start.has_value()) {
        for (const at::Tensor* t : {&*doc_start, &*doc_end}) {
            TORCH_CHECK(t->device() == q.device() && t->scalar_type() == at::kInt && t->is_contiguous() &&
                            t->dim() == 1 && t->size(0) == q.size(1),
                        "doc_start and doc_end must be contiguous int32 [T] tensors on q's device");
        }
        TORCH_CHECK(q.size(0) == 1, "packed documents need batch 1");
        p.doc_start = doc_start->data_ptr<int>();
        p.doc_end = doc_end->data_ptr<int>();
    }
    return p;
}

void fwd(const at::Tensor& q, const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
         const std::optional<at::Tensor>& depth_k, const std::optional<at::Tensor>& depth_v, at::Tensor& out,
         at::Tensor& lse, double scale, bool causal, int64_t depth_chunk, const std::optional<at::Tensor>& doc_start,
         const std::optional<at::Tensor>& doc_end) {
    moda::FwdParams p =
        make_fwd_params(q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk, doc_start, doc_end);
    c10::cuda::CUDAGuard guard(q.device());
    const char* error = moda::run_fwd(p, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error[0] == '\0', "moda_cuda CUDA forward: ", error);
}

// Strides of a gradient that must match its input's shape.
void check_grad(const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& input, const char* name,
                const at::Tensor& q) {
    TORCH_CHECK(grad.has_value() == input.has_value(), name, " must be given exactly when its input is");
    if (!grad.has_value()) return;
    check_tensor(*grad, name, q, input->dim());
    TORCH_CHECK(grad->sizes() == input->sizes(), name, " must have its input's shape");
}

void bwd(const at::Tensor& q, const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
         const std::optional<at::Tensor>& depth_k, const std::optional<at::Tensor>& depth_v, const at::Tensor& out,
         const at::Tensor& lse, const at::Tensor& dout, const std::optional<at::Tensor>& grad_lse, at::Tensor& grad_q,
         std::optional<at::Tensor> grad_k, std::optional<at::Tensor> grad_v, std::optional<at::Tensor> grad_depth_k,
         std::optional<at::Tensor> grad_depth_v, double scale, bool causal, int64_t depth_chunk, bool deterministic,
         bool accumulate_depth_grads, const std::optional<at::Tensor>& doc_start,
         const std::optional<at::Tensor>& doc_end) {
    moda::BwdParams p{};
    p.fwd = make_fwd_params(q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk, doc_start, doc_end);
    check_tensor(dout, "dout", q, 4);
    TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have q's shape");
    p.dout = dout.data_ptr();
    p.do_batch_stride = dout.stride(0), p.do_seq_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
    if (grad_lse.has_value()) {
        TORCH_CHECK(grad_lse->is_cuda() && grad_lse->scalar_type() == at::kFloat && grad_lse->is_contiguous() &&
                        grad_lse->sizes() == lse.sizes(),
                    "grad_lse must be a contiguous float32 CUDA tensor shaped like lse");
        p.grad_lse = grad_lse->data_ptr<float>();
    }
    at::Tensor delta = at::empty_like(lse);
    p.delta = delta.data_ptr<float>();
    at::Tensor row_stats = at::empty({moda::bwd_row_stats_floats(p.fwd)}, lse.options());
    p.row_stats = row_stats.data_ptr<float>();
    p.deterministic = deterministic;
    at::Tensor dq_accum;  // the fused dQ's fp32 sums, added into with atomics: starts at zero
    if (const int64_t floats = moda::bwd_dq_accum_floats(p.fwd, deterministic); floats > 0) {
        dq_accum = at::zeros({floats}, lse.options());
        p.dq_accum = dq_accum.data_ptr<float>();
    }
    check_tensor(grad_q, "grad_q", q, 4);
    TORCH_CHECK(grad_q.sizes() == q.sizes(), "grad_q must have q's shape");
    p.grad_q = grad_q.data_ptr();
    p.gq_batch_stride = grad_q.stride(0), p.gq_seq_stride = grad_q.stride(1), p.gq_head_stride = grad_q.stride(2);
    check_grad(grad_k, k, "grad_k", q);
    check_grad(grad_v, v, "grad_v", q);
    if (grad_k.has_value()) {
        p.grad_k = grad_k->data_ptr(), p.grad_v = grad_v->data_ptr();
        p.gk_batch_stride = grad_k->stride(0), p.gk_seq_stride = grad_k->stride(1), p.gk_head_stride = grad_k->stride(2);
        p.gv_batch_stride = grad_v->stride(0), p.gv_seq_stride = grad_v->stride(1), p.gv_head_stride = grad_v->stride(2);
    }
    check_grad(grad_depth_k, depth_k, "grad_depth_k", q);
    check_grad(grad_depth_v, depth_v, "grad_depth_v", q);
    if (grad_depth_k.has_value() && p.fwd.depth > 0) {
        p.grad_depth_k = grad_depth_k->data_ptr(), p.grad_depth_v = grad_depth_v->data_ptr();
        p.gdk_batch_stride = grad_depth_k->stride(0), p.gdk_seq_stride = grad_depth_k->stride(1);
        p.gdk_slot_stride = grad_depth_k->stride(2), p.gdk_head_stride = grad_depth_k->stride(3);
        p.gdv_batch_stride = grad_depth_v->stride(0), p.gdv_seq_stride = grad_depth_v->stride(1);
        p.gdv_slot_stride = grad_depth_v->stride(2), p.gdv_head_stride = grad_depth_v->stride(3);
    }
    p.accumulate_depth_grads = accumulate_depth_grads;
    c10::cuda::CUDAGuard guard(q.device());
    const char* error = moda::run_bwd(p, at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(error[0] == '\0', "moda_cuda CUDA backward: ", error);
}

std::vector<std::string> compiled_archs() { return {MODA_COMPILED_ARCHS}; }

std::string cuda_version() {
    return std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10);
}

}  // namespace

void bind_kernel_launch(pybind11::module_& m);  // kernel_launch.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "moda_cuda CUDA kernels (Hopper)";
    m.def("fwd", &fwd,
          "MoDA forward: writes out [B, T, Hq, D] and lse [B, Hq, T] (natural log); doc_start, doc_end (int32 "
          "[T], batch 1): packed documents, each position's document [start, end)",
          py::arg("q"),
          py::arg("k"), py::arg("v"), py::arg("depth_k"), py::arg("depth_v"), py::arg("out"), py::arg("lse"),
          py::arg("scale"), py::arg("causal"), py::arg("depth_chunk"), py::arg("doc_start") = py::none(),
          py::arg("doc_end") = py::none());
    m.def("bwd", &bwd,
          "MoDA backward: writes grad_q [B, T, Hq, D], grad_k, grad_v [B, T, Hk, D] and grad_depth_k, "
          "grad_depth_v [B, T, L, Hk, D]; deterministic=True: bitwise repeatable (no atomics), else at D = 64 "
          "grad_q is accumulated with fp32 atomics (faster); accumulate_depth_grads=True: the depth gradients are "
          "added to what grad_depth_k / grad_depth_v hold instead of overwriting them",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("depth_k"), py::arg("depth_v"), py::arg("out"),
          py::arg("lse"), py::arg("dout"), py::arg("grad_lse"), py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"),
          py::arg("grad_depth_k"), py::arg("grad_depth_v"), py::arg("scale"), py::arg("causal"),
          py::arg("depth_chunk"), py::arg("deterministic"), py::arg("accumulate_depth_grads") = false,
          py::arg("doc_start") = py::none(), py::arg("doc_end") = py::none());
    m.def("compiled_archs", &compiled_archs, "GPU architectures the kernels were compiled for");
    m.def("cuda_version", &cuda_version, "CUDA toolkit version the extension was built with");
    bind_kernel_launch(m);
}
