// TeamLoRA's inference update for generation on CPU: `route`, the routing tail in one pass instead
// of ~5 small PyTorch ops, and `add_update`, a layer's whole update in one call from Python.
// route: for each token row [z (r) | logits (k)] of x [A; R]^T (+ bias), with mix (k x r) float32:
//   phi = softmax(logits),  q = phi mix,  update = z * q / t
// where t = 1 (mode 0, the closed form), max(|q|_1, eps) (mode 1, l1; eps < 0: no guard) or
// sum(q) (mode 2, reference). The same maths and order as TeamLoRALinear._forward_inference.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

torch::Tensor route(const torch::Tensor& z_logits, const torch::Tensor& mix, int64_t mode, double eps) {
  TORCH_CHECK(z_logits.device().is_cpu() && mix.device().is_cpu(), "route: CPU tensors only");
  TORCH_CHECK(z_logits.scalar_type() == at::kFloat && mix.scalar_type() == at::kFloat, "route: float32 only");
  TORCH_CHECK(z_logits.dim() == 2 && z_logits.stride(1) == 1, "route: z_logits must be (N, r + k) with unit column stride");
  TORCH_CHECK(mix.dim() == 2 && mix.is_contiguous(), "route: mix must be a contiguous (k, r) matrix");
  TORCH_CHECK(0 <= mode && mode <= 2, "route: mode must be 0 (closed), 1 (l1) or 2 (reference)");
  const int64_t k = mix.size(0), r = mix.size(1), n = z_logits.size(0), ld = z_logits.stride(0);
  TORCH_CHECK(z_logits.size(1) == r + k, "route: z_logits has ", z_logits.size(1), " columns, mix needs ", r + k);
  auto out = torch::empty({n, r}, z_logits.options());
  const float* rows = z_logits.data_ptr<float>();
  const float* m = mix.data_ptr<float>();
  float* update = out.data_ptr<float>();
  const float guard = static_cast<float>(eps);
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> phi(k), q(r);
    for (int64_t t = begin; t < end; ++t) {
      const float* z = rows + t * ld;
      const float* logits = z + r;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < k; ++j) top = std::max(top, logits[j]);
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += (phi[j] = std::exp(logits[j] - top));
      for (int64_t j = 0; j < k; ++j) phi[j] /= sum;
      std::fill(q.begin(), q.end(), 0.f);
      for (int64_t j = 0; j < k; ++j)
        for (int64_t c = 0; c < r; ++c) q[c] += phi[j] * m[j * r + c];
      float total = 1.f;
      if (mode != 0) {
        total = 0.f;
        for (int64_t c = 0; c < r; ++c) total += mode == 1 ? std::fabs(q[c]) : q[c];
        if (mode == 1 && guard >= 0.f) total = std::max(total, guard);
      }
      float* u = update + t * r;
      for (int64_t c = 0; c < r; ++c) u[c] = z[c] * q[c] / total;
    }
  });
  return out;
}

// The whole adapter update of one layer: result + alpha * route(h [A; R]^T + bias) B^T, (N, d_out),
// so a decode step crosses from Python once per layer for it. bias: (N or 1, r + k) or undefined.
torch::Tensor add_update(const torch::Tensor& result, const torch::Tensor& h, const torch::Tensor& down_t,
                         const c10::optional<torch::Tensor>& bias, const torch::Tensor& mix,
                         const torch::Tensor& lora_b, int64_t mode, double eps, double alpha) {
  auto z_logits = bias.has_value() ? at::addmm(*bias, h, down_t) : at::mm(h, down_t);
  return at::addmm(result, route(z_logits, mix, mode, eps), lora_b.t(), 1.0, alpha);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // without the GIL: other Python threads (a data loader, a server) keep running meanwhile
  module.def("route", &route, "TeamLoRA routing tail: z * (softmax(logits) mix) / norm, per token row",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("add_update", &add_update, "result + alpha * route(h [A; R]^T + bias) B^T",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
