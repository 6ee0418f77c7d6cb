// GELU (tanh approximation) over a float32 buffer in one pass that also writes the derivative,
// for the fused linear + bias + GELU of `fused_ops.cpp`. Compiled on its own with
// -mavx2 -mfma (build.rs) and called only after a runtime CPU check, so nothing else in the
// crate needs those instructions. It includes no libtorch header: an inline function compiled
// here with AVX2 could otherwise be the copy the linker keeps for every translation unit.
//
// gelu(x) = 0.5·x·(1 + tanh(y)), y = √(2/π)·(x + 0.044715·x³). With 0.5·(1 + tanh(y)) =
// σ(2y) = 1 / (1 + e^(−2y)) this is x·s with s = σ(2y), and
// gelu'(x) = s + x·s·(1 − s)·2·√(2/π)·(1 + 3·0.044715·x²), with 1 − s = e^(−2y)·s:
// one exponential per element for both, where ATen's forward and backward each evaluate a tanh.

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {

constexpr float kBeta = 0.7978845608028654f;  // √(2/π)
constexpr float kCubic = 0.044715f;

// e^x, Cephes' single-precision polynomial (about 1 ulp on the clamped range).
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline void gelu8(const float *in, float *out, float *deriv) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 x = _mm256_loadu_ps(in);
  __m256 x2 = _mm256_mul_ps(x, x);
  // 2y = 2β·x·(1 + c·x²)
  __m256 inner = _mm256_fmadd_ps(_mm256_set1_ps(kCubic), x2, one);
  __m256 two_y = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f * kBeta), x), inner);
  __m256 z = exp256(_mm256_sub_ps(_mm256_setzero_ps(), two_y));
  __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, z));
  // 1 − s as z·s: where s is close to 1 the difference would lose the digits that matter.
  __m256 one_minus_s = _mm256_mul_ps(z, s);
  // d(2y)/dx = 2β·(1 + 3c·x²)
  __m256 dy = _mm256_mul_ps(_mm256_set1_ps(2.0f * kBeta),
                            _mm256_fmadd_ps(_mm256_set1_ps(3.0f * kCubic), x2, one));
  __m256 xs = _mm256_mul_ps(x, s);
  __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(xs, one_minus_s), dy, s);
  _mm256_storeu_ps(out, xs);
  _mm256_storeu_ps(deriv, d);
}

}  // namespace

// `n` elements of `in` → gelu into `out` (may be `in`) and gelu' into `deriv`. A tail shorter
// than a vector goes through a zero-padded scratch block, so it is computed by the same
// instructions as the rest.
extern "C" int gantry_gelu_avx2_built() { return 1; }

extern "C" void gantry_gelu_tanh_avx2(const float *in, float *out, float *deriv, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) gelu8(in + i, out + i, deriv + i);
  if (i < n) {
    float a[8] = {0}, o[8], d[8];
    for (int64_t j = i; j < n; ++j) a[j - i] = in[j];
    gelu8(a, o, d);
    for (int64_t j = i; j < n; ++j) {
      out[j] = o[j - i];
      deriv[j] = d[j - i];
    }
  }
}

#else
// Built without AVX2/FMA (another architecture): fused_ops.cpp asks gantry_gelu_avx2_built()
// first and never calls the stub.
extern "C" int gantry_gelu_avx2_built() { return 0; }

extern "C" void gantry_gelu_tanh_avx2(const float *, float *, float *, int64_t) {}
#endif
