// Metal host code of QLoRA (macOS only; kernels in metal/qlora.h, maths in ops/qlora.h).
// Same schedule as the CUDA backend: xa = x_d A, then one gemm with the LoRA epilogue;
// backward: g = s dy Bᵀ, dA, dB, dx_d by the skinny kernel, dx by the gemm.
#include "backend/metal/common.h"
#include "common/checks.h"
#include "ops/qlora.h"

namespace mlx_tuner {

namespace {

// out[i, q] = alpha Σ_t P[i, t] Q[t, q] (strides in elements).
void skinny(mx::Stream s, const mx::array& p, int64_t ps_i, int64_t ps_t, const mx::array& q,
            int64_t qs_t, int64_t qs_q, mx::array& out, int64_t os_i, int64_t os_q, int ni,
            int nq, int nt, float alpha) {
  if (ni == 0 || nq == 0) {
    return;
  }
  auto l = qlora_skinny_launch(ni, nq, dtype_str(p.dtype()), dtype_str(out.dtype()));
  auto& enc = metal::begin(s, l);
  enc.set_input_array(p, 0);
  enc.set_input_array(q, 1);
  enc.set_output_array(out, 2);
  int64_t strides[6] = {ps_i, ps_t, qs_t, qs_q, os_i, os_q};
  for (int i = 0; i < 6; ++i) {
    enc.set_bytes(strides[i], 3 + i);
  }
  enc.set_bytes(ni, 9);
  enc.set_bytes(nq, 10);
  enc.set_bytes(nt, 11);
  enc.set_bytes(alpha, 12);
  metal::dispatch(enc, l);
}

void gemm(mx::Stream s, bool fwd, const mx::array& x, const std::vector<mx::array>& in,
          int bits, int m, int n_out, int kred, int group_size, const mx::array* l,
          const mx::array& r_arr, int r, int rs_q, int rs_j, float alpha, const mx::array* bias,
          mx::array& out) {
  if (m == 0 || n_out == 0) {
    return;
  }
  auto launch = qlora_gemm_launch(fwd, m, n_out, bits, dtype_str(x.dtype()));
  auto& enc = metal::begin(s, launch);
  enc.set_input_array(x, 0);
  enc.set_input_array(in[1], 1);
  enc.set_input_array(in[2], 2);
  enc.set_input_array(in[3], 3);
  enc.set_input_array(l ? *l : r_arr, 4); // unused when use_lora == 0
  enc.set_input_array(r_arr, 5);
  enc.set_input_array(bias ? *bias : x, 6); // unused when use_bias == 0
  enc.set_output_array(out, 7);
  int ints[7] = {m, n_out, kred, group_size, r, rs_q, rs_j};
  for (int i = 0; i < 7; ++i) {
    enc.set_bytes(ints[i], 8 + i);
  }
  enc.set_bytes(alpha, 15);
  enc.set_bytes(static_cast<int>(l != nullptr), 16);
  enc.set_bytes(static_cast<int>(bias != nullptr), 17);
  metal::dispatch(enc, launch);
}

} // namespace

void QLoRA::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  for (auto& o : outs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  const auto& x = in[0];
  const int n = in[1].shape(0), k = x.shape(-1), r = in[4].shape(1);
  const int m = k == 0 ? 0 : x.size() / k;
  const auto& xd = p_.has_xd ? in[6] : x;
  const mx::array* bias = p_.has_bias ? &in[p_.has_xd ? 7 : 6] : nullptr;
  auto s = stream();
  skinny(s, xd, k, 1, in[4], r, 1, outs[1], r, 1, m, r, k, 1.0f);
  gemm(s, true, x, in, p_.bits, m, n, k, p_.group_size, r > 0 ? &outs[1] : nullptr, in[5], r,
       n, 1, p_.scale, bias, outs[0]);
}

void QLoRAVJP::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  for (auto& o : outs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  const auto &dy = in[0], &xd = in[6];
  const int n = in[1].shape(0), k = xd.shape(-1), r = in[4].shape(1);
  const int m = k == 0 ? 0 : xd.size() / k;
  int o = 0;
  mx::array* dx = g_.dx ? &outs[o++] : nullptr;
  mx::array* dxd = g_.dxd ? &outs[o++] : nullptr;
  mx::array* da = g_.da ? &outs[o++] : nullptr;
  mx::array* db = g_.db ? &outs[o++] : nullptr;
  auto s = stream();
  auto g = metal::temporary(s, {m, r}, mx::float32); // s dy Bᵀ
  skinny(s, dy, n, 1, in[5], 1, n, g, r, 1, m, r, n, p_.scale);
  if (da) {
    skinny(s, xd, 1, k, g, r, 1, *da, r, 1, k, r, m, 1.0f);
  }
  if (db) {
    skinny(s, dy, 1, n, in[7], r, 1, *db, 1, n, n, r, m, p_.scale);
  }
  if (dxd) {
    skinny(s, g, r, 1, in[4], 1, r, *dxd, k, 1, m, k, r, 1.0f);
  }
  if (dx) {
    gemm(s, false, dy, in, p_.bits, m, k, n, p_.group_size,
         (!p_.has_xd && r > 0) ? &g : nullptr, in[4], r, 1, r, 1.0f, nullptr, *dx);
  }
}

} // namespace mlx_tuner
