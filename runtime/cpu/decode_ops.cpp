// effc's fused decode loop (effc.runtime.decode): the small operators, each one call where torch
// spends five to fifteen op dispatches (RMSNorm with the residual add fused in, SiLU(gate) * up,
// and attention on the static KV cache: rotary embedding, cache write, scores, softmax and the
// weighted sum of values), and Plan, which runs a whole forward of a LLaMA-style model with them
// and the BSR (or dense) linear layers, without returning to Python between operators. At a decode
// step every tensor here is a few KB, so the time torch spends is its per-op overhead, not
// arithmetic; these are plain loops over the rows.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <string>
#include <vector>

// bsr_kernels.cpp
torch::Tensor bsr_linear(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                         torch::Tensor scales, torch::Tensor zeros, int64_t out_features, int64_t group, int64_t bits);
torch::Tensor bsr_linear_a8(torch::Tensor x, torch::Tensor indptr, torch::Tensor indices, torch::Tensor values,
                            torch::Tensor scales, torch::Tensor zeros, int64_t out_features, int64_t group);

namespace {

// RMSNorm of one row, as HF computes it in fp32: h = (x * rsqrt(mean(x^2) + eps)) * w. The mean is
// accumulated in double (torch's fp32 reduction differs from it in the last bit at most).
inline void norm_row(const float* x, const float* w, float* h, int64_t d, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
  for (int64_t i = 0; i < d; ++i) h[i] = (x[i] * r) * w[i];
}

void check_rows(const torch::Tensor& x, const torch::Tensor& w, const char* name) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), name, ": x must be contiguous float32 (T, D)");
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1),
              name, ": weight must be contiguous float32 of the row length");
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, w, "rms_norm");
  auto h = torch::empty_like(x);
  const int64_t d = x.size(1);
  for (int64_t t = 0; t < x.size(0); ++t)
    norm_row(x.data_ptr<float>() + t * d, w.data_ptr<float>(), h.data_ptr<float>() + t * d, d, static_cast<float>(eps));
  return h;
}

// x += delta (in place, the residual stream), then the RMSNorm of the new x.
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor w, double eps) {
  check_rows(x, w, "add_rms_norm");
  TORCH_CHECK(delta.dtype() == torch::kFloat32 && delta.is_contiguous() && delta.sizes() == x.sizes(),
              "add_rms_norm: delta must be contiguous float32 of x's shape");
  auto h = torch::empty_like(x);
  const int64_t d = x.size(1), n = x.numel();
  float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) xp[i] += dp[i];
  for (int64_t t = 0; t < x.size(0); ++t) norm_row(xp + t * d, w.data_ptr<float>(), h.data_ptr<float>() + t * d, d, static_cast<float>(eps));
  return h;
}

// e^x for 8 lanes (Cephes' expf: range reduction by ln 2 in two parts, degree-5 polynomial; about
// 1 ulp). -inf gives 0, as softmax needs for masked scores; NaN stays NaN (min/max return their
// second operand when either is NaN).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x));
  // floor(x log2 e + 1/2), not round-to-even: at the clamp -127.5 must give -127 (a zero exponent field)
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// SiLU(gate) * up for gu = [gate | up] (T, 2F), the fused gate/up projection's output:
// gate / (1 + e^-gate) * up, as torch computes SiLU.
torch::Tensor silu_mul(torch::Tensor gu) {
  TORCH_CHECK(gu.dtype() == torch::kFloat32 && gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0,
              "silu_mul: input must be contiguous float32 (T, 2F)");
  const int64_t f = gu.size(1) / 2;
  auto out = torch::empty({gu.size(0), f}, gu.options());
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (int64_t t = 0; t < gu.size(0); ++t) {
    const float* g = gu.data_ptr<float>() + t * 2 * f;
    float* o = out.data_ptr<float>() + t * f;
    int64_t i = 0;
    for (; i + 8 <= f; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp8(_mm256_sub_ps(zero, gv));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(g + f + i)));
    }
    for (; i < f; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * g[f + i];
  }
  return out;
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// HF's rotary embedding of one head: out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
inline void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t dh) {
  const int64_t half = dh / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
  for (int64_t i = half; i < dh; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// Attention of T tokens at positions pos .. pos + T - 1: qkv (T, (H + 2G) * dh) rows [q (H heads) |
// k (G) | v (G)], the stacked projection's output; cos/sin the rotary tables (max_len, dh); caches
// (G, max_len, dh) of this layer. Writes each token's rotated k and its v at its row of the caches
// and returns (T, H * dh): token t attends to rows 0 .. pos + t (causal). Query heads h share kv
// head h / (H / G) (grouped-query attention).
torch::Tensor attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                     int64_t pos, int64_t n_heads, double scale) {
  TORCH_CHECK(k_cache.dtype() == torch::kFloat32 && k_cache.dim() == 3 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.dtype() == torch::kFloat32 && v_cache.is_contiguous(),
              "attend: caches must be contiguous float32 (kv heads, max_len, head dim) of one shape");
  const int64_t g_heads = k_cache.size(0), len = k_cache.size(1), dh = k_cache.size(2);
  TORCH_CHECK(dh % 8 == 0, "attend: head dim must be a multiple of 8");
  TORCH_CHECK(n_heads > 0 && n_heads % g_heads == 0, "attend: query heads must be a multiple of kv heads");
  TORCH_CHECK(qkv.dtype() == torch::kFloat32 && qkv.dim() == 2 && qkv.is_contiguous() &&
                  qkv.size(1) == (n_heads + 2 * g_heads) * dh,
              "attend: qkv must be contiguous float32 (tokens, [q | k | v])");
  const int64_t T = qkv.size(0), width = qkv.size(1);
  TORCH_CHECK(pos >= 0 && pos + T <= len, "attend: positions ", pos, " .. ", pos + T - 1, " are outside the cache (", len, ")");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) >= pos + T &&
                  cos.size(1) == dh,
              "attend: cos and sin must be contiguous float32 tables (positions, head dim) covering the tokens");
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* k = qkv.data_ptr<float>() + t * width + n_heads * dh;
    const float* v = k + g_heads * dh;
    for (int64_t g = 0; g < g_heads; ++g) {
      rotate(k + g * dh, cs + (pos + t) * dh, sn + (pos + t) * dh, kc + (g * len + pos + t) * dh, dh);
      std::copy(v + g * dh, v + (g + 1) * dh, vc + (g * len + pos + t) * dh);
    }
  }
  auto out = torch::empty({T, n_heads * dh}, qkv.options());
  const int64_t rep = n_heads / g_heads, padded = (pos + T + 7) / 8 * 8;
  float* o = out.data_ptr<float>();
  // (token, head) pairs on threads once there is enough work to pay for the fork (from about 32
  // positions for one token: 1.3-1.6x one thread at 48-200 positions on Zen 3)
#pragma omp parallel if ((pos + T) * T * dh >= 2048)
  {
    std::vector<float> qr(dh), p(padded);
#pragma omp for schedule(static)
    for (int64_t th = 0; th < T * n_heads; ++th) {
      const int64_t t = th / n_heads, h = th % n_heads, g = h / rep, n = pos + t + 1;
      rotate(qkv.data_ptr<float>() + t * width + h * dh, cs + (pos + t) * dh, sn + (pos + t) * dh, qr.data(), dh);
      const float* keys = kc + g * len * dh;
      const float* values = vc + g * len * dh;
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < dh; d += 8)
          acc = _mm256_fmadd_ps(_mm256_loadu_ps(qr.data() + d), _mm256_loadu_ps(keys + j * dh + d), acc);
        p[j] = hsum8(acc) * static_cast<float>(scale);
        m = std::max(m, p[j]);
      }
      const int64_t n8 = (n + 7) / 8 * 8;
      for (int64_t j = n; j < n8; ++j) p[j] = -INFINITY;
      __m256 total = _mm256_setzero_ps();
      const __m256 mv = _mm256_set1_ps(m);
      for (int64_t j = 0; j < n8; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.data() + j), mv));
        _mm256_storeu_ps(p.data() + j, e);
        total = _mm256_add_ps(total, e);
      }
      const float inv = 1.0f / hsum8(total);
      float* oh = o + t * n_heads * dh + h * dh;
      for (int64_t d = 0; d < dh; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(values + j * dh + d), acc);
        _mm256_storeu_ps(oh + d, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
      }
    }
  }
  return out;
}

// One linear layer of the decode plan: BSR with fp32 x, BSR with int8 x, or a dense fp32 weight.
// Built from BSRLinear / nn.Linear modules (effc.runtime.decode), whose arrays were validated.
struct Linear {
  enum Kind { kBSR, kBSRA8, kDense } kind;
  std::vector<torch::Tensor> t;  // BSR: indptr, indices, values, scales, zeros; dense: the weight
  c10::optional<torch::Tensor> bias;
  int64_t out, group, bits;

  Linear(const std::string& name, std::vector<torch::Tensor> tensors, c10::optional<torch::Tensor> b, int64_t out_features,
         int64_t g, int64_t nbits)
      : t(std::move(tensors)), bias(std::move(b)), out(out_features), group(g), bits(nbits) {
    TORCH_CHECK(name == "bsr" || name == "bsr_a8" || name == "dense", "Linear: kind must be bsr, bsr_a8 or dense, not ", name);
    kind = name == "bsr" ? kBSR : name == "bsr_a8" ? kBSRA8 : kDense;
    TORCH_CHECK(t.size() == (kind == kDense ? 1u : 5u), "Linear: ", name, " takes ", kind == kDense ? 1 : 5, " tensors");
    if (kind == kDense)
      TORCH_CHECK(t[0].dtype() == torch::kFloat32 && t[0].dim() == 2 && t[0].size(0) == out, "Linear: dense weight must be float32 (out, in)");
    if (bias) TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->numel() == out, "Linear: bias must be float32 of out_features");
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    if (kind == kDense) return at::linear(x, t[0], bias);
    torch::Tensor y = kind == kBSR ? bsr_linear(x, t[0], t[1], t[2], t[3], t[4], out, group, bits)
                                   : bsr_linear_a8(x, t[0], t[1], t[2], t[3], t[4], out, group);
    if (bias) y.add_(*bias);
    return y;
  }
};

// Projections that read one input: their outputs side by side (one Linear where they are stacked).
torch::Tensor run(const std::vector<Linear>& parts, const torch::Tensor& x) {
  if (parts.size() == 1) return parts[0](x);
  std::vector<torch::Tensor> outs;
  for (const auto& part : parts) outs.push_back(part(x));
  return at::cat(outs, 1);
}

// A whole LLaMA-style forward of T tokens in one call: per layer, RMSNorm, stacked q/k/v, attention
// on the cache, o, residual add + RMSNorm, stacked gate/up, SiLU(gate) * up, down, residual add +
// the next norm; then the final norm and lm_head on the last token. Eight operator calls a layer,
// none through Python.
struct Plan {
  struct Layer {
    std::vector<Linear> qkv, o, gate_up, down;
    torch::Tensor in_w, post_w;
    double in_eps, post_eps;
  };
  torch::Tensor k_cache, v_cache, cos, sin;  // (layers, G, max_len, dh); (max_len, dh)
  int64_t n_heads;
  double scale;
  torch::Tensor final_w;
  double final_eps;
  std::vector<Linear> head;
  std::vector<Layer> layers;

  Plan(torch::Tensor kc, torch::Tensor vc, torch::Tensor c, torch::Tensor s, int64_t heads, double sc, torch::Tensor fw,
       double feps, std::vector<Linear> lm_head)
      : k_cache(std::move(kc)), v_cache(std::move(vc)), cos(std::move(c)), sin(std::move(s)), n_heads(heads), scale(sc),
        final_w(std::move(fw)), final_eps(feps), head(std::move(lm_head)) {}

  void add_layer(std::vector<Linear> qkv, std::vector<Linear> o, std::vector<Linear> gate_up, std::vector<Linear> down,
                 torch::Tensor in_w, double in_eps, torch::Tensor post_w, double post_eps) {
    TORCH_CHECK((int64_t)layers.size() < k_cache.size(0), "Plan: more layers than the cache holds");
    layers.push_back({std::move(qkv), std::move(o), std::move(gate_up), std::move(down), std::move(in_w), std::move(post_w),
                      in_eps, post_eps});
  }

  // x: (T, D) float32 embeddings of the tokens at pos .. pos + T - 1 (used as the residual stream,
  // so overwritten). Returns the logits of the last token, (1, vocab).
  torch::Tensor forward(torch::Tensor x, int64_t pos) {
    TORCH_CHECK((int64_t)layers.size() == k_cache.size(0), "Plan: ", layers.size(), " layers added, the cache has ", k_cache.size(0));
    torch::Tensor h = rms_norm(x, layers[0].in_w, layers[0].in_eps);
    for (size_t i = 0; i < layers.size(); ++i) {
      const Layer& layer = layers[i];
      torch::Tensor qkv = run(layer.qkv, h);
      torch::Tensor att = attend(qkv, cos, sin, k_cache.select(0, i), v_cache.select(0, i), pos, n_heads, scale);
      h = add_rms_norm(x, run(layer.o, att), layer.post_w, layer.post_eps);
      torch::Tensor act = silu_mul(run(layer.gate_up, h));
      const bool last = i + 1 == layers.size();
      h = add_rms_norm(x, run(layer.down, act), last ? final_w : layers[i + 1].in_w, last ? final_eps : layers[i + 1].in_eps);
    }
    return run(head, h.slice(0, h.size(0) - 1).contiguous());
  }
};

}  // namespace

void register_decode_ops(pybind11::module_& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row of x (T, D)");
  m.def("add_rms_norm", &add_rms_norm, "x += delta in place, then RMSNorm of each row of x");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of [gate | up] rows");
  m.def("attend", &attend, "rotary grouped-query attention of tokens at pos.. on a static KV cache (writes it)");
  pybind11::class_<Linear>(m, "Linear")
      .def(pybind11::init<const std::string&, std::vector<torch::Tensor>, c10::optional<torch::Tensor>, int64_t, int64_t,
                          int64_t>())
      .def("__call__", &Linear::operator(), pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_readonly("out_features", &Linear::out);
  pybind11::class_<Plan>(m, "Plan")
      .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, double, torch::Tensor, double,
                          std::vector<Linear>>())
      .def("add_layer", &Plan::add_layer)
      .def("forward", &Plan::forward, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "logits of the last of x's tokens; releases the GIL (no Python runs inside)");
}
