// Layer optim: the optimizer kernels (CPU SIMD; CUDA fused when built with CUDA).
#include "bindings.h"

#include "zeal/features.h"
#include "zeal/optim/cpu_optim.h"
#if ZEAL_WITH_CUDA
#include "zeal/optim/fused_adam.h"
#include "zeal/optim/fused_lamb.h"
#endif

namespace zeal::bindings {
void bind_optim(py::module_& m) {
#if ZEAL_WITH_CUDA
  m.def("fused_adam_step",
        [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
           const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq, double lr, double beta1,
           double beta2, double eps, double weight_decay, bool adamw, bool bias_correction, int64_t step) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, adamw, bias_correction, step};
          py::gil_scoped_release nogil;
          optim::fused_adam_step(params, grads, exp_avg, exp_avg_sq, h);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("adamw"),
        py::arg("bias_correction"), py::arg("step"), "Multi-tensor fused Adam/AdamW on CUDA tensors.");
  m.def("fused_lamb_step",
        [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
           const std::vector<at::Tensor>& exp_avg, const std::vector<at::Tensor>& exp_avg_sq, double lr, double beta1,
           double beta2, double eps, double weight_decay, bool bias_correction, int64_t step, double min_coeff,
           double max_coeff) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, true, bias_correction, step};
          py::gil_scoped_release nogil;
          optim::fused_lamb_step(params, grads, exp_avg, exp_avg_sq, h, min_coeff, max_coeff);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("bias_correction"),
        py::arg("step"), py::arg("min_coeff"), py::arg("max_coeff"),
        "Multi-tensor fused LAMB on CUDA tensors (a trust ratio per tensor).");
#endif
  m.def("cpu_adam_step",
        [](const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
           double lr, double beta1, double beta2, double eps, double weight_decay, bool adamw, bool bias_correction,
           int64_t step, std::optional<at::Tensor> half_copy, const std::string& isa) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, adamw, bias_correction, step,
                             isa.empty() ? nullptr : isa.c_str()};
          py::gil_scoped_release nogil;
          optim::cpu_adam_step(params, grads, exp_avg, exp_avg_sq, h, half_copy ? &*half_copy : nullptr);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("adamw"),
        py::arg("bias_correction"), py::arg("step"), py::arg("half_copy") = py::none(), py::arg("isa") = "",
        "One Adam/AdamW step on contiguous fp32 CPU tensors (vectorised, multithreaded).");
  m.def("unscale_and_sum_squares", &optim::unscale_and_sum_squares, py::arg("grads"), py::arg("inv_scale"),
        py::call_guard<py::gil_scoped_release>(),
        "grads *= inv_scale in place; returns the sum of squares of the result (one pass; CPU or CUDA).");
  m.def("cpu_triad",
        [](const at::Tensor& a, const at::Tensor& b, std::optional<at::Tensor> c, double scalar) {
          py::gil_scoped_release nogil;
          optim::cpu_triad(a, b, c ? *c : at::Tensor(), scalar);
        },
        py::arg("a"), py::arg("b"), py::arg("c") = py::none(), py::arg("scalar") = 3.0,
        "The bandwidth roofline: a = b + scalar * c (STREAM triad), or a += scalar * b without c.");
  m.def("cpu_adam_isa", &optim::cpu_adam_isa, "The instruction set the CPU optimizer kernels use on this CPU.");
  m.def("cpu_adagrad_step", &optim::cpu_adagrad_step, py::arg("params"), py::arg("grads"), py::arg("state_sum"),
        py::arg("lr"), py::arg("lr_decay"), py::arg("weight_decay"), py::arg("eps"), py::arg("step"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cpu_sgd_step", &optim::cpu_sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffer"),
        py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
        py::arg("first_step"), py::call_guard<py::gil_scoped_release>());
  m.def("cpu_lamb_step",
        [](const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
           double lr, double beta1, double beta2, double eps, double weight_decay, bool bias_correction, int64_t step,
           double min_coeff, double max_coeff) {
          optim::AdamHyper h{lr, beta1, beta2, eps, weight_decay, true, bias_correction, step};
          py::gil_scoped_release nogil;
          return optim::cpu_lamb_step(params, grads, exp_avg, exp_avg_sq, h, min_coeff, max_coeff);
        },
        py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("bias_correction"),
        py::arg("step"), py::arg("min_coeff"), py::arg("max_coeff"), "One LAMB step on one tensor; returns its trust ratio.");
}

}  // namespace zeal::bindings
