/* superweight's native CPU kernels: min/max RTN in one pass over the weights, and bit packing.
 *
 * Built on first use by quant/native.py (gcc -O3 -march=native, no -ffast-math: every float
 * operation is the IEEE one torch computes, in the same order), called through ctypes (the GIL is
 * released, so Python threads split the work). Each function is bitwise the torch reference it
 * replaces (quant/kernels.py and quant/search.py for RTN, quant/pack.py for packing); the tests check
 * it. A return value of 1 means "not finite" (a NaN or inf weight, or a parameter that overflows
 * float16): the caller then runs the torch path, which raises its own one-line error.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

typedef _Float16 half;

static inline float clampf(float v, float lo, float hi) { /* torch.clamp: max(v, lo), then min(.., hi) */
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

static inline uint16_t half_bits(half h) { uint16_t b; memcpy(&b, &h, 2); return b; }
static inline half bits_half(uint16_t b) { half h; memcpy(&h, &b, 2); return h; }

/* torch.nextafter(h, -inf) / (h, +inf) for a finite float16 */
static inline half half_down(half h) {
    uint16_t b = half_bits(h);
    if ((b & 0x7fff) == 0) return bits_half(0x8001);
    return bits_half((b & 0x8000) ? b + 1 : b - 1);
}

static inline half half_up(half h) {
    uint16_t b = half_bits(h);
    if ((b & 0x7fff) == 0) return bits_half(0x0001);
    return bits_half((b & 0x8000) ? b - 1 : b + 1);
}

static inline int finite_half(half h) { return (half_bits(h) & 0x7c00) != 0x7c00; }

/* search.UniformGrid.minmax for one run, float16 parameters: the zero rounded down, the scale up,
 * a scale that is not positive replaced by 1. Returns 1 when a parameter is not finite. */
static inline int params_half(float lo, float hi, int qmax, float *s, float *z, uint16_t *sb, uint16_t *zb) {
    lo = lo + 0.0f; /* -0 -> +0, as grid.minmax does */
    half zh = (half)lo;
    if (!finite_half(zh)) return 1;
    if ((float)zh > lo) zh = half_down(zh);
    float zf = (float)zh;
    float t = (hi - zf) / (float)qmax;
    half sh = (half)t;
    if (!finite_half(sh)) return 1;
    if ((float)sh < t) sh = half_up(sh);
    if (!((float)sh > 0.0f)) sh = (half)1.0f;
    *s = (float)sh; *z = zf; *sb = half_bits(sh); *zb = half_bits(zh);
    return 0;
}

static inline int params_float(float lo, float hi, int qmax, float *s, float *z) {
    lo = lo + 0.0f;
    float t = (hi - lo) / (float)qmax;
    if (!(lo - lo == 0.0f) || !(t - t == 0.0f)) return 1;
    *s = t > 0.0f ? t : 1.0f; *z = lo;
    return 0;
}

/* Min and max of v[0..n) (n >= 1); returns 1 when a value is NaN. min/max are exact, so their
 * order does not matter: a -0 / +0 tie is the only choice, and the caller maps -0 to +0. */
static inline int run_range(const float *v, int64_t n, float *plo, float *phi) {
    float lo = v[0], hi = v[0];
    int nan = 0;
    int64_t i = 0;
#ifdef __AVX2__
    if (n >= 8) {
        __m256 l = _mm256_loadu_ps(v), h = l, bad = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            __m256 a = _mm256_loadu_ps(v + i);
            l = _mm256_min_ps(a, l); /* NaN a: keeps l; caught by bad */
            h = _mm256_max_ps(a, h);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        }
        float ls[8], hs[8];
        _mm256_storeu_ps(ls, l); _mm256_storeu_ps(hs, h);
        nan = _mm256_movemask_ps(bad) != 0;
        for (int k = 0; k < 8; k++) { lo = ls[k] < lo ? ls[k] : lo; hi = hs[k] > hi ? hs[k] : hi; }
    }
#endif
    for (; i < n; i++) {
        float a = v[i];
        nan |= a != a;
        lo = a < lo ? a : lo;
        hi = a > hi ? a : hi;
    }
    *plo = lo; *phi = hi;
    return nan;
}

/* codes of v[0..n): clamp(round_half_even((clamp(v, b0, b1) - z) / s), 0, q) as uint8 (no NaN in v) */
static inline void run_codes(const float *v, int64_t n, float z, float s, float q, int bounded, float b0, float b1,
                             uint8_t *out) {
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 zv = _mm256_set1_ps(z), sv = _mm256_set1_ps(s), qv = _mm256_set1_ps(q), zero = _mm256_setzero_ps();
    const __m256 lov = _mm256_set1_ps(b0), hiv = _mm256_set1_ps(b1);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; i + 32 <= n; i += 32) {
        __m256i c[4];
        for (int k = 0; k < 4; k++) {
            __m256 a = _mm256_loadu_ps(v + i + 8 * k);
            if (bounded) a = _mm256_min_ps(_mm256_max_ps(a, lov), hiv);
            a = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(a, zv), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            c[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(a, zero), qv));
        }
        __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_permutevar8x32_epi32(w, order));
    }
#endif
    for (; i < n; i++) {
        float a = bounded ? clampf(v[i], b0, b1) : v[i];
        out[i] = (uint8_t)clampf(__builtin_rintf((a - z) / s), 0.0f, q);
    }
}

/* Min/max RTN of the runs [first, last) of x ([rows, row_len], runs of `size`, the last of each
 * row maybe shorter; run j is row j / runs, column (j % runs) * size). bounds: NULL or the clip
 * range [2], applied to every value first. Parameters go to scale/zero ([rows, runs], float16 bits
 * when param_half, else float32), codes (uint8) to codes at the values' own positions. */
int sw_rtn_minmax(const float *x, int64_t row_len, int64_t size, int qmax, const float *bounds,
                  int param_half, void *scale, void *zero, uint8_t *codes, int64_t first, int64_t last) {
    const int64_t runs = (row_len + size - 1) / size;
    const float b0 = bounds ? bounds[0] : 0.0f, b1 = bounds ? bounds[1] : 0.0f;
    for (int64_t j = first; j < last; j++) {
        const int64_t row = j / runs, col = (j % runs) * size;
        const int64_t n = row_len - col < size ? row_len - col : size;
        const float *v = x + row * row_len + col;
        float lo, hi, s, z;
        if (run_range(v, n, &lo, &hi)) return 1;
        if (bounds) { lo = clampf(lo, b0, b1); hi = clampf(hi, b0, b1); }
        if (param_half) {
            uint16_t sb, zb;
            if (params_half(lo, hi, qmax, &s, &z, &sb, &zb)) return 1;
            ((uint16_t *)scale)[j] = sb; ((uint16_t *)zero)[j] = zb;
        } else {
            if (params_float(lo, hi, qmax, &s, &z)) return 1;
            ((float *)scale)[j] = s; ((float *)zero)[j] = z;
        }
        run_codes(v, n, z, s, (float)qmax, bounds != NULL, b0, b1, codes + row * row_len + col);
    }
    return 0;
}

/* pack.pack_bits for the codes [first, last) (first a multiple of 8): the LSB-first stream of
 * `bits`-bit codes, every 8 codes filling `bits` bytes of out (which starts at code 0). */
#define PACK_LOOP(BITS)                                                              \
    for (; i + 8 <= last; i += 8) {                                                  \
        uint64_t acc = 0;                                                            \
        for (int k = 0; k < 8; k++) acc |= (uint64_t)c[i + k] << (k * BITS);         \
        memcpy(out + i / 8 * BITS, &acc, BITS);                                      \
    }

int sw_pack_bits(const uint8_t *c, int bits, uint8_t *out, int64_t first, int64_t last) {
    int64_t i = first;
    switch (bits) {
        case 1: PACK_LOOP(1) break;
        case 2: PACK_LOOP(2) break;
        case 3: PACK_LOOP(3) break;
        case 4: PACK_LOOP(4) break;
        case 5: PACK_LOOP(5) break;
        case 6: PACK_LOOP(6) break;
        case 7: PACK_LOOP(7) break;
        default: return 1;
    }
    if (i < last) { /* the stream's last, partial octet: ceil(rest * bits / 8) bytes */
        uint64_t acc = 0;
        for (int k = 0; i + k < last; k++) acc |= (uint64_t)c[i + k] << (k * bits);
        memcpy(out + i / 8 * bits, &acc, ((last - i) * bits + 7) / 8);
    }
    return 0;
}

/* Sum and sum of squares (float64) of x's chunks [first, last) of `chunk` values each (the last
 * maybe shorter): sums[2 * c] and sums[2 * c + 1] for chunk c. Fixed order inside a chunk, so the
 * caller's exact sum over chunks is the same for any thread count. */
void sw_sum_squares(const float *x, int64_t n, int64_t chunk, double *sums, int64_t first, int64_t last) {
    for (int64_t c = first; c < last; c++) {
        const float *v = x + c * chunk;
        const int64_t m = n - c * chunk < chunk ? n - c * chunk : chunk;
        double s = 0.0, q = 0.0;
        int64_t i = 0;
#ifdef __AVX2__
        __m256d s0 = _mm256_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
        for (; i + 8 <= m; i += 8) {
            __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(v + i)), b = _mm256_cvtps_pd(_mm_loadu_ps(v + i + 4));
            s0 = _mm256_add_pd(s0, a); s1 = _mm256_add_pd(s1, b);
            q0 = _mm256_add_pd(q0, _mm256_mul_pd(a, a)); q1 = _mm256_add_pd(q1, _mm256_mul_pd(b, b));
        }
        double ss[4], qs[4];
        _mm256_storeu_pd(ss, _mm256_add_pd(s0, s1)); _mm256_storeu_pd(qs, _mm256_add_pd(q0, q1));
        s = (ss[0] + ss[1]) + (ss[2] + ss[3]); q = (qs[0] + qs[1]) + (qs[2] + qs[3]);
#endif
        for (; i < m; i++) { double a = v[i]; s += a; q += a * a; }
        sums[2 * c] = s; sums[2 * c + 1] = q;
    }
}
