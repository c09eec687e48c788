/* superweight's native CPU kernels for min/max RTN: quantize (one pass per run, packing on the fly),
 * pack, dequantize, the fake-quantized write-back with its SQNR sums, and the z-score clip's sums.
 *
 * Built on first use by quant/native.py (gcc -O3 -march=native -ffp-contract=off -fopenmp, no
 * -ffast-math: every float operation is the IEEE one torch computes, in the same order), called
 * through ctypes. The loops over runs / chunks run on `threads` OpenMP threads (torch's own runtime
 * where it is libgomp.so.1, so its warm threads), and every result is the same for any thread count.
 * Each function is bitwise the torch reference it replaces (quant/kernels.py and quant/search.py for
 * RTN, quant/pack.py for packing); tests/test_quant_native.py checks it. A return value of 1 means
 * "not finite" (a NaN or inf weight, or a parameter that overflows float16): the caller then runs
 * the torch path, which raises its own one-line error.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__BMI2__)
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

/* Run j of a [rows, row_len] tensor cut in runs of `size` (`runs` per row, the last maybe shorter):
 * its first element's offset, and its length in *n. */
static inline int64_t run_at(int64_t j, int64_t runs, int64_t row_len, int64_t size, int64_t *n) {
    const int64_t row = j / runs, col = (j % runs) * size;
    *n = row_len - col < size ? row_len - col : size;
    return row * row_len + col;
}

/* Run j's parameter from a [rows, runs] table of float16 bits (param_half) or float32 */
static inline float param_at(const void *table, int param_half, int64_t j) {
    return param_half ? (float)bits_half(((const uint16_t *)table)[j]) : ((const float *)table)[j];
}

/* Min and max of v[0..n) (n >= 1); returns 1 when a value is NaN. min/max are exact, so their
 * order does not matter: a -0 / +0 tie is the only choice, and the caller maps -0 to +0. */
static inline int run_range(const float *v, int64_t n, float *plo, float *phi) {
    float lo = v[0], hi = v[0];
    int nan = 0;
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (n >= 16) {
        __m512 l = _mm512_loadu_ps(v), h = l;
        __mmask16 bad = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 a = _mm512_loadu_ps(v + i);
            l = _mm512_min_ps(a, l); /* NaN a: keeps l; caught by bad */
            h = _mm512_max_ps(a, h);
            bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        }
        nan = bad != 0;
        lo = _mm512_reduce_min_ps(l);
        hi = _mm512_reduce_max_ps(h);
    }
#elif defined(__AVX2__)
    if (n >= 8) {
        __m256 l = _mm256_loadu_ps(v), h = l, bad = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            __m256 a = _mm256_loadu_ps(v + i);
            l = _mm256_min_ps(a, l); /* NaN a: keeps l; caught by bad */
            h = _mm256_max_ps(a, h);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        }
        nan = _mm256_movemask_ps(bad) != 0;
        __m128 l4 = _mm_min_ps(_mm256_castps256_ps128(l), _mm256_extractf128_ps(l, 1));
        __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        l4 = _mm_min_ps(l4, _mm_movehl_ps(l4, l4)); h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
        l4 = _mm_min_ss(l4, _mm_shuffle_ps(l4, l4, 1)); h4 = _mm_max_ss(h4, _mm_shuffle_ps(h4, h4, 1));
        lo = _mm_cvtss_f32(l4); hi = _mm_cvtss_f32(h4);
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
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 zv = _mm512_set1_ps(z), sv = _mm512_set1_ps(s), qv = _mm512_set1_ps(q), zero = _mm512_setzero_ps();
    const __m512 lov = _mm512_set1_ps(b0), hiv = _mm512_set1_ps(b1);
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_loadu_ps(v + i);
        if (bounded) a = _mm512_min_ps(_mm512_max_ps(a, lov), hiv);
        a = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(a, zv), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        a = _mm512_min_ps(_mm512_max_ps(a, zero), qv);
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(a)));
    }
#elif defined(__AVX2__)
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

/* pack.pack_bits of the n codes c[0..n), c[0] starting a byte of out: the LSB-first stream of
 * `bits`-bit codes, every 8 codes filling `bits` bytes. */
#ifdef __BMI2__ /* one pext per 8 codes: their low BITS bits each, side by side */
#define PACK_LOOP(BITS)                                                              \
    for (const uint64_t mask = 0x0101010101010101ULL * ((1u << BITS) - 1); i + 8 <= n; i += 8) { \
        uint64_t w;                                                                  \
        memcpy(&w, c + i, 8);                                                        \
        w = _pext_u64(w, mask);                                                      \
        memcpy(out + i / 8 * BITS, &w, BITS);                                        \
    }
#else
#define PACK_LOOP(BITS)                                                              \
    for (; i + 8 <= n; i += 8) {                                                  \
        uint64_t acc = 0;                                                            \
        for (int k = 0; k < 8; k++) acc |= (uint64_t)c[i + k] << (k * BITS);         \
        memcpy(out + i / 8 * BITS, &acc, BITS);                                      \
    }
#endif

static inline int pack_octets(const uint8_t *c, int64_t n, int bits, uint8_t *out) {
    int64_t i = 0;
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
    if (i < n) { /* the stream's last, partial octet: ceil(rest * bits / 8) bytes */
        uint64_t acc = 0;
        for (int k = 0; i + k < n; k++) acc |= (uint64_t)c[i + k] << (k * bits);
        memcpy(out + i / 8 * bits, &acc, ((n - i) * bits + 7) / 8);
    }
    return 0;
}

/* pack.pack_bits of the n codes c into out, blocks of PACK_BLOCK codes on `threads` threads */
#define PACK_BLOCK (1 << 16)
int sw_pack_bits(const uint8_t *c, int64_t n, int bits, uint8_t *out, int threads) {
    const int64_t blocks = (n + PACK_BLOCK - 1) / PACK_BLOCK;
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t m = n - b * PACK_BLOCK < PACK_BLOCK ? n - b * PACK_BLOCK : PACK_BLOCK;
        bad |= pack_octets(c + b * PACK_BLOCK, m, bits, out + b * (PACK_BLOCK / 8) * bits);
    }
    return bad;
}

/* pack.unpack_bits: the first n codes of the LSB-first stream p of `bits`-bit codes, one per byte of c */
#ifdef __BMI2__ /* one pdep per 8 codes */
#define UNPACK_LOOP(BITS)                                                            \
    for (const uint64_t mask = 0x0101010101010101ULL * ((1u << BITS) - 1); i + 8 <= n; i += 8) { \
        uint64_t w = 0;                                                              \
        memcpy(&w, p + i / 8 * BITS, BITS);                                          \
        w = _pdep_u64(w, mask);                                                      \
        memcpy(c + i, &w, 8);                                                        \
    }
#else
#define UNPACK_LOOP(BITS)                                                            \
    for (; i + 8 <= n; i += 8) {                                                  \
        uint64_t w = 0;                                                              \
        memcpy(&w, p + i / 8 * BITS, BITS);                                          \
        for (int k = 0; k < 8; k++) c[i + k] = (uint8_t)((w >> (k * BITS)) & ((1u << BITS) - 1)); \
    }
#endif

static inline int unpack_octets(const uint8_t *p, int64_t n, int bits, uint8_t *c) {
    int64_t i = 0;
    switch (bits) {
        case 1: UNPACK_LOOP(1) break;
        case 2: UNPACK_LOOP(2) break;
        case 3: UNPACK_LOOP(3) break;
        case 4: UNPACK_LOOP(4) break;
        case 5: UNPACK_LOOP(5) break;
        case 6: UNPACK_LOOP(6) break;
        case 7: UNPACK_LOOP(7) break;
        default: return 1;
    }
    if (i < n) { /* the last, partial octet: ceil(rest * bits / 8) bytes */
        uint64_t w = 0;
        memcpy(&w, p + i / 8 * bits, ((n - i) * bits + 7) / 8);
        for (int k = 0; i + k < n; k++) c[i + k] = (uint8_t)((w >> (k * bits)) & ((1u << bits) - 1));
    }
    return 0;
}

int sw_unpack_bits(const uint8_t *p, int64_t n, int bits, uint8_t *c, int threads) {
    const int64_t blocks = (n + PACK_BLOCK - 1) / PACK_BLOCK;
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t m = n - b * PACK_BLOCK < PACK_BLOCK ? n - b * PACK_BLOCK : PACK_BLOCK;
        bad |= unpack_octets(p + b * (PACK_BLOCK / 8) * bits, m, bits, c + b * PACK_BLOCK);
    }
    return bad;
}

#define PACK_CHUNK 1024 /* codes a run packs at a time (a multiple of 8) */

/* Min/max RTN of all runs of x ([rows, row_len], runs of `size`, the last of each
 * row maybe shorter; run j is row j / runs, column (j % runs) * size). bounds: NULL or the clip
 * range [2], applied to every value first. Parameters go to scale/zero ([rows, runs], float16 bits
 * when param_half, else float32), codes (uint8) to codes at the values' own positions; or, when
 * pack_bits > 0 (row_len and size multiples of 8, so every run is whole bytes of the stream), straight
 * into the packed stream codes (pack.pack_bits at pack_bits bits), never stored one per byte. */
static int rtn_run(const float *x, int64_t row_len, int64_t size, int64_t runs, int qmax, const float *bounds,
                   int param_half, void *scale, void *zero, uint8_t *codes, int pack_bits, int64_t j) {
    uint8_t buf[PACK_CHUNK];
    const float b0 = bounds ? bounds[0] : 0.0f, b1 = bounds ? bounds[1] : 0.0f;
    int64_t n;
    const int64_t at = run_at(j, runs, row_len, size, &n);
    const float *v = x + at;
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
    if (!pack_bits) {
        run_codes(v, n, z, s, (float)qmax, bounds != NULL, b0, b1, codes + at);
        return 0;
    }
    for (int64_t off = 0; off < n; off += PACK_CHUNK) {
        const int64_t m = n - off < PACK_CHUNK ? n - off : PACK_CHUNK;
        run_codes(v + off, m, z, s, (float)qmax, bounds != NULL, b0, b1, buf);
        if (pack_octets(buf, m, pack_bits, codes + (at + off) / 8 * pack_bits)) return 1;
    }
    return 0;
}

int sw_rtn_minmax(const float *x, int64_t rows, int64_t row_len, int64_t size, int qmax, const float *bounds,
                  int param_half, void *scale, void *zero, uint8_t *codes, int pack_bits, int threads) {
    const int64_t runs = (row_len + size - 1) / size, total = rows * runs;
    int bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad)
    for (int64_t j = 0; j < total; j++)
        bad |= rtn_run(x, row_len, size, runs, qmax, bounds, param_half, scale, zero, codes, pack_bits, j);
    return bad;
}

/* Sum and sum of squares (float64) of x's chunks of `chunk` values each (the last maybe shorter):
 * sums[2 * c] and sums[2 * c + 1] for chunk c. Fixed order inside a chunk, so the caller's exact
 * sum over chunks is the same for any thread count. */
void sw_sum_squares(const float *x, int64_t n, int64_t chunk, double *sums, int threads) {
    const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
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

/* The artifact's dequantization (search.UniformGrid.levels_: q * scale + zero, a float32 multiply
 * then an add, never fused: built with -ffp-contract=off) of every run, into out. */
void sw_rtn_dense(const uint8_t *codes, int64_t rows, int64_t row_len, int64_t size, int param_half, const void *scale,
                  const void *zero, float *out, int threads) {
    const int64_t runs = (row_len + size - 1) / size, total = rows * runs;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < total; j++) {
        int64_t n;
        const int64_t at = run_at(j, runs, row_len, size, &n);
        const float s = param_at(scale, param_half, j), z = param_at(zero, param_half, j);
        const uint8_t *q = codes + at;
        float *o = out + at;
        for (int64_t i = 0; i < n; i++) o[i] = (float)q[i] * s + z;
    }
}

/* SQNR's sums over the chunks of `chunk` values: sum x^2 and sum (y - x)^2 (the difference in float32,
 * as sqnr and sw_rtn_write_back take it; squares and sums in float64) */
void sw_sqnr_sums(const float *x, const float *y, int64_t n, int64_t chunk, double *sums, int threads) {
    const int64_t chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t off = c * chunk, m = n - off < chunk ? n - off : chunk;
        double sig = 0.0, noise = 0.0;
        int64_t i = 0;
#ifdef __AVX2__
        __m256d s0 = _mm256_setzero_pd(), q0 = s0;
        for (; i + 4 <= m; i += 4) {
            const __m128 x4 = _mm_loadu_ps(x + off + i);
            __m256d a = _mm256_cvtps_pd(x4), d = _mm256_cvtps_pd(_mm_sub_ps(_mm_loadu_ps(y + off + i), x4));
            s0 = _mm256_add_pd(s0, _mm256_mul_pd(a, a)); q0 = _mm256_add_pd(q0, _mm256_mul_pd(d, d));
        }
        double ss[4], qs[4];
        _mm256_storeu_pd(ss, s0); _mm256_storeu_pd(qs, q0);
        sig = (ss[0] + ss[1]) + (ss[2] + ss[3]); noise = (qs[0] + qs[1]) + (qs[2] + qs[3]);
#endif
        for (; i < m; i++) { const float d = y[off + i] - x[off + i]; sig += (double)x[off + i] * x[off + i]; noise += (double)d * d; }
        sums[2 * c] = sig; sums[2 * c + 1] = noise;
    }
}

/* sums[0] / sums[1]: the runs' (signal, noise) pairs added in run order (the same for any thread count) */
static void add_run_sums(const double *run_sums, int64_t total, double *sums) {
    double sig = 0.0, noise = 0.0;
    for (int64_t j = 0; j < total; j++) { sig += run_sums[2 * j]; noise += run_sums[2 * j + 1]; }
    sums[0] = sig; sums[1] = noise;
}

/* The fake-quantized write-back in one pass: every value of w ([rows, row_len], float32) becomes
 * its dequantized code (q * scale + zero, the bits sw_rtn_dense writes), and sums[0] / sums[1] get
 * sum w^2 and sum (w_new - w)^2 (the difference in float32, as sqnr takes it; squares and sums in
 * float64): per run, then added in run order (the same for any thread count). */
void sw_rtn_write_back(float *w, const uint8_t *codes, int64_t rows, int64_t row_len, int64_t size, int param_half,
                       const void *scale, const void *zero, double *run_sums, double *sums, int threads) {
    const int64_t runs = (row_len + size - 1) / size, total = rows * runs;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < total; j++) {
        int64_t n;
        const int64_t at = run_at(j, runs, row_len, size, &n);
        const float s = param_at(scale, param_half, j), z = param_at(zero, param_half, j);
        const uint8_t *q = codes + at;
        float *v = w + at;
        double sig = 0.0, noise = 0.0;
        int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
        __m512d sg = _mm512_setzero_pd(), ns = _mm512_setzero_pd();
        for (; i + 16 <= n; i += 16) {
            const __m512 a = _mm512_loadu_ps(v + i);
            const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i)))), sv), zv);
            const __m512 d = _mm512_sub_ps(y, a);
            const __m512d a0 = _mm512_cvtps_pd(_mm512_castps512_ps256(a)), a1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(a, 1));
            const __m512d d0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d)), d1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(d, 1));
            sg = _mm512_add_pd(sg, _mm512_add_pd(_mm512_mul_pd(a0, a0), _mm512_mul_pd(a1, a1)));
            ns = _mm512_add_pd(ns, _mm512_add_pd(_mm512_mul_pd(d0, d0), _mm512_mul_pd(d1, d1)));
            _mm512_storeu_ps(v + i, y);
        }
        sig = _mm512_reduce_add_pd(sg); noise = _mm512_reduce_add_pd(ns);
#elif defined(__AVX2__)
        const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
        __m256d sg = _mm256_setzero_pd(), ns = _mm256_setzero_pd();
        for (; i + 8 <= n; i += 8) {
            const __m256 a = _mm256_loadu_ps(v + i);
            const __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)))), sv), zv);
            const __m256 d = _mm256_sub_ps(y, a);
            const __m256d a0 = _mm256_cvtps_pd(_mm256_castps256_ps128(a)), a1 = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
            const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
            sg = _mm256_add_pd(sg, _mm256_add_pd(_mm256_mul_pd(a0, a0), _mm256_mul_pd(a1, a1)));
            ns = _mm256_add_pd(ns, _mm256_add_pd(_mm256_mul_pd(d0, d0), _mm256_mul_pd(d1, d1)));
            _mm256_storeu_ps(v + i, y);
        }
        double sgs[4], nss[4];
        _mm256_storeu_pd(sgs, sg); _mm256_storeu_pd(nss, ns);
        sig = (sgs[0] + sgs[1]) + (sgs[2] + sgs[3]); noise = (nss[0] + nss[1]) + (nss[2] + nss[3]);
#endif
        for (; i < n; i++) {
            const float y = (float)q[i] * s + z, d = y - v[i];
            sig += (double)v[i] * v[i]; noise += (double)d * d;
            v[i] = y;
        }
        run_sums[2 * j] = sig; run_sums[2 * j + 1] = noise;
    }
    add_run_sums(run_sums, total, sums);
}

/* bfloat16 <-> float32 as torch converts them (c10::BFloat16: round to nearest even on the bits; the
 * NaN case never arises from q * scale + zero with finite parameters) */
static inline float bf16_float(uint16_t b) { const uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t float_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* sw_rtn_write_back for a bfloat16 weight: each value becomes its dequantized code (q * scale + zero
 * in float32, as sw_rtn_dense computes it) rounded to bfloat16 (what dequantize(torch.bfloat16)
 * stores); the sums are over the old and new bfloat16 values (the difference in float32, squares and
 * sums in float64), per run, then added in run order. */
void sw_rtn_write_back_bf16(uint16_t *w, const uint8_t *codes, int64_t rows, int64_t row_len, int64_t size, int param_half,
                            const void *scale, const void *zero, double *run_sums, double *sums, int threads) {
    const int64_t runs = (row_len + size - 1) / size, total = rows * runs;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < total; j++) {
        int64_t n;
        const int64_t at = run_at(j, runs, row_len, size, &n);
        const float s = param_at(scale, param_half, j), z = param_at(zero, param_half, j);
        const uint8_t *q = codes + at;
        uint16_t *v = w + at;
        double sig = 0.0, noise = 0.0;
        for (int64_t i = 0; i < n; i++) {
            const float old = bf16_float(v[i]);
            const uint16_t b = float_bf16((float)q[i] * s + z);
            const float d = bf16_float(b) - old;
            sig += (double)old * old; noise += (double)d * d;
            v[i] = b;
        }
        run_sums[2 * j] = sig; run_sums[2 * j + 1] = noise;
    }
    add_run_sums(run_sums, total, sums);
}

/* ---------------------------------------------------------------- 4-bit group-wise linear layers
 * A packed int4 layer (quant/runtime.py, kernel "native") holds its codes as [N, K / 8] 32-bit words in chunks
 * of 64 weights (8 words): bits 4j..4j+3 of word i hold weight 8j + i, so shifting a chunk's 8 words right by
 * 4j and masking gives weights 8j..8j+7 in order, with no shuffle (the AVX2 loop reads a chunk as one vector);
 * scale and zero are float32 per [N, runs] run of `size` weights along the row (the last run may be
 * shorter); weight = q * scale + zero. K and `size` are multiples of 64. */

/* The codes of rows of K weights, one per byte, into that layout. */
void sw_int4_pack(const uint8_t *codes, int64_t rows, int64_t K, uint32_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *q = codes + r * K;
        uint32_t *o = out + r * (K / 8);
        for (int64_t c = 0; c < K; c += 64)
            for (int i = 0; i < 8; i++) {
                uint32_t w = 0;
                for (int j = 0; j < 8; j++) w |= (uint32_t)(q[c + 8 * j + i] & 15) << (4 * j);
                o[c / 8 + i] = w;
            }
    }
}

/* The AVX2 loop skips the shifts: word & (15 << 4j) converted to float is exactly q * 16^j (a 4-bit integer
 * times a power of two) for j < 7, so it multiplies x scaled by 16^-j (exact, a power of two), which sw_int4_mm
 * prepares once per call (xs); j = 7 (the sign bit) is shifted down. Each product q * x is then the same float
 * as unscaled. The portable loop shifts and reads x as it is (SW_SCALED_X 0). */
#if defined(__AVX2__) && defined(__FMA__)
#define SW_SCALED_X 1
static inline float x_scale(int64_t k) { const int j = (int)(k % 64) / 8; return j == 7 ? 1.0f : 1.0f / (float)(1 << (4 * j)); }

static inline float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_k w[k] x[k] over one row: per run, scale * (sum q x) + zero * xsum (xs: x scaled as above). */
static float row_dot(const uint32_t *row, const float *xs, const float *xsum, const float *scale, const float *zero,
                     int64_t K, int64_t size, int64_t runs) {
    __m256 acc = _mm256_setzero_ps();
    float zacc = 0.0f;
    for (int64_t g = 0; g < runs; g++) {
        const int64_t k0 = g * size, k1 = k0 + size < K ? k0 + size : K;
        __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
        for (int64_t k = k0; k < k1; k += 64) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(row + k / 8));
            const float *xk = xs + k;
#define SW_Q(j) _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << (4 * (j)))))
            d0 = _mm256_fmadd_ps(SW_Q(0), _mm256_loadu_ps(xk), d0);
            d1 = _mm256_fmadd_ps(SW_Q(1), _mm256_loadu_ps(xk + 8), d1);
            d0 = _mm256_fmadd_ps(SW_Q(2), _mm256_loadu_ps(xk + 16), d0);
            d1 = _mm256_fmadd_ps(SW_Q(3), _mm256_loadu_ps(xk + 24), d1);
            d0 = _mm256_fmadd_ps(SW_Q(4), _mm256_loadu_ps(xk + 32), d0);
            d1 = _mm256_fmadd_ps(SW_Q(5), _mm256_loadu_ps(xk + 40), d1);
            d0 = _mm256_fmadd_ps(SW_Q(6), _mm256_loadu_ps(xk + 48), d0);
            d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28)), _mm256_loadu_ps(xk + 56), d1);
#undef SW_Q
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scale[g]), _mm256_add_ps(d0, d1), acc);
        zacc += zero[g] * xsum[g];
    }
    return hsum256(acc) + zacc;
}
#else
#define SW_SCALED_X 0
static float row_dot(const uint32_t *row, const float *x, const float *xsum, const float *scale, const float *zero,
                     int64_t K, int64_t size, int64_t runs) {
    float acc = 0.0f;
    for (int64_t g = 0; g < runs; g++) {
        const int64_t k0 = g * size, k1 = k0 + size < K ? k0 + size : K;
        float d[8] = {0};
        for (int64_t k = k0; k < k1; k += 64)
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < 8; i++)
                    d[i] += (float)((row[k / 8 + i] >> (4 * j)) & 15) * x[k + 8 * j + i];
        const float dg = ((d[0] + d[4]) + (d[1] + d[5])) + ((d[2] + d[6]) + (d[3] + d[7]));
        acc += scale[g] * dg + zero[g] * xsum[g];
    }
    return acc;
}
#endif

/* y[m, n] = sum_k x[m, k] w[n, k] + sum_j val[j] x[m, col[j]] for m < M, the second sum over row n's held-out
 * entries (ptr[n]..ptr[n + 1]; ptr NULL: none). work: room for M * (K + runs) floats (x scaled, where the loop
 * reads it scaled, and its per-run sums), filled here once. Rows are split between the threads; each y[m, n] is summed by one thread
 * in one order, so the result is the same for any thread count. */
void sw_int4_mm(const float *x, float *work, int64_t M, int64_t K, const uint32_t *codes, const float *scale,
                const float *zero, int64_t N, int64_t size, const int64_t *ptr, const int32_t *col, const float *val,
                float *y, int threads) {
    const int64_t runs = (K + size - 1) / size;
    const float *xs = SW_SCALED_X ? work : x;  /* what row_dot reads */
    float *xsum = work + M * K;
    for (int64_t m = 0; m < M; m++) {
#if SW_SCALED_X
        for (int64_t k = 0; k < K; k++) work[m * K + k] = x[m * K + k] * x_scale(k);
#endif
        for (int64_t g = 0; g < runs; g++) {
            const int64_t k1 = (g + 1) * size < K ? (g + 1) * size : K;
            float t = 0.0f;
            for (int64_t k = g * size; k < k1; k++) t += x[m * K + k];
            xsum[m * runs + g] = t;
        }
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float t = row_dot(codes + n * (K / 8), xs + m * K, xsum + m * runs, scale + n * runs, zero + n * runs, K,
                              size, runs);
            if (ptr)
                for (int64_t j = ptr[n]; j < ptr[n + 1]; j++) t += val[j] * xm[col[j]];
            y[m * N + n] = t;
        }
}

/* Rows r0..r1 of the dequantized weights (q * scale + zero in float32, a multiply then an add: bitwise
 * sw_rtn_dense and search.UniformGrid.levels_), into out [r1 - r0, K]. */
void sw_int4_dense(const uint32_t *codes, const float *scale, const float *zero, int64_t r0, int64_t r1, int64_t K,
                   int64_t size, float *out, int threads) {
    const int64_t runs = (K + size - 1) / size;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = r0; n < r1; n++) {
        const uint32_t *row = codes + n * (K / 8);
        float *o = out + (n - r0) * K;
        for (int64_t k = 0; k < K; k += 64) {
            const float s = scale[n * runs + k / size], z = zero[n * runs + k / size];
            for (int j = 0; j < 8; j++)
                for (int i = 0; i < 8; i++) o[k + 8 * j + i] = (float)((row[k / 8 + i] >> (4 * j)) & 15) * s + z;
        }
    }
}
