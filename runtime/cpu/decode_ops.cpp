// The small per-token operators of effc's decode loop (effc.runtime.decode), one call each where
// torch spends five to fifteen op dispatches: RMSNorm (with the residual add fused in), SiLU(gate)
// * up, and single-query attention on the static KV cache (rotary embedding, cache write, scores,
// softmax and the weighted sum of values). At a decode step every tensor here is a few KB, so the
// time torch spends is its per-op overhead, not arithmetic; these are plain loops over the rows.
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <vector>

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

// One query token at position pos: qkv = [q (H heads) | k (G) | v (G)] (1, (H + 2G) * dh), the fused
// projection's output; caches (G, L, dh) of this layer. Writes the rotated k and the v at row pos of
// the caches and returns the attention output (1, H * dh) over rows 0..pos. Query heads h share kv
// head h / (H / G) (grouped-query attention).
torch::Tensor attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
                     int64_t pos, int64_t n_heads, double scale) {
  TORCH_CHECK(k_cache.dtype() == torch::kFloat32 && k_cache.dim() == 3 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.dtype() == torch::kFloat32 && v_cache.is_contiguous(),
              "attend: caches must be contiguous float32 (kv heads, max_len, head dim) of one shape");
  const int64_t g_heads = k_cache.size(0), len = k_cache.size(1), dh = k_cache.size(2);
  TORCH_CHECK(dh % 8 == 0, "attend: head dim must be a multiple of 8");
  TORCH_CHECK(n_heads > 0 && n_heads % g_heads == 0, "attend: query heads must be a multiple of kv heads");
  TORCH_CHECK(pos >= 0 && pos < len, "attend: position ", pos, " is outside the cache (", len, ")");
  TORCH_CHECK(qkv.dtype() == torch::kFloat32 && qkv.is_contiguous() && qkv.numel() == (n_heads + 2 * g_heads) * dh,
              "attend: qkv must be contiguous float32 [q | k | v] of one token");
  TORCH_CHECK(cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == dh && sin.numel() == dh,
              "attend: cos and sin must be contiguous float32 of the head dim");
  const float* q = qkv.data_ptr<float>();
  const float* k = q + n_heads * dh;
  const float* v = k + g_heads * dh;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t g = 0; g < g_heads; ++g) {
    rotate(k + g * dh, cos.data_ptr<float>(), sin.data_ptr<float>(), kc + (g * len + pos) * dh, dh);
    std::copy(v + g * dh, v + (g + 1) * dh, vc + (g * len + pos) * dh);
  }
  auto out = torch::empty({1, n_heads * dh}, qkv.options());
  const int64_t rep = n_heads / g_heads, n = pos + 1, padded = (n + 7) / 8 * 8;
  float* o = out.data_ptr<float>();
  // heads on threads once there is enough work per head to pay for the fork
#pragma omp parallel if (n * dh >= 2048)
  {
    std::vector<float> qr(dh), p(padded);
#pragma omp for schedule(static)
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t g = h / rep;
      rotate(q + h * dh, cos.data_ptr<float>(), sin.data_ptr<float>(), qr.data(), dh);
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
      for (int64_t j = n; j < padded; ++j) p[j] = -INFINITY;
      __m256 total = _mm256_setzero_ps();
      const __m256 mv = _mm256_set1_ps(m);
      for (int64_t j = 0; j < padded; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.data() + j), mv));
        _mm256_storeu_ps(p.data() + j, e);
        total = _mm256_add_ps(total, e);
      }
      const float inv = 1.0f / hsum8(total);
      float* oh = o + h * dh;
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

}  // namespace

void register_decode_ops(pybind11::module_& m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row of x (T, D)");
  m.def("add_rms_norm", &add_rms_norm, "x += delta in place, then RMSNorm of each row of x");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up of [gate | up] rows");
  m.def("attend", &attend, "one decode step of rotary grouped-query attention on a static KV cache");
}
