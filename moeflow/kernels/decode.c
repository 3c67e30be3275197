/* The small per-layer ops of a decode step, where torch's per-op cost outweighs the arithmetic:
 * RMSNorm of a few rows (torch decomposes it into ~8 ops, ~24 µs for one 576-wide row inside a
 * decode), and attention of one new token per sequence over its KV cache, with the cache write
 * (torch: an index_put, a slice, and a padded scaled_dot_product_attention, ~90 µs a layer).
 *
 * Activations and caches are fp32, bf16 or fp16, all in one dtype; the arithmetic is fp32 and
 * each result is rounded once to the dtype (round to nearest even, as torch converts). Built
 * with -fopenmp like linear.c, so a long cache is split over torch's own thread pool. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float ld(const void *p, int64_t i, int dt) {
    if (dt == F32) return ((const float *)p)[i];
    uint16_t v = ((const uint16_t *)p)[i];
    if (dt == F16) return _cvtsh_ss(v);
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

static inline void st(void *p, int64_t i, int dt, float f) {
    if (dt == F32) {
        ((float *)p)[i] = f;
    } else if (dt == F16) {
        ((uint16_t *)p)[i] = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
    } else {
        union { float f; uint32_t u; } c = {.f = f};
        uint32_t u = c.u;
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            u |= 0x00400000u;  /* NaN stays a (quiet) NaN */
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
        }
        ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    }
}

/* the value as the dtype holds it (fp32 arithmetic on a rounded operand, as torch's 16-bit ops) */
static inline float round_to(float f, int dt) {
    if (dt == F32) return f;
    uint16_t h;
    st(&h, 0, dt, f);
    return ld(&h, 0, dt);
}

/* 8 values of a row from index i, widened to fp32 */
static inline __m256 ld8(const void *p, int64_t i, int dt) {
    if (dt == F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dt == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum a[i] * b[i], a fp32, b in dt */
static inline float dot(const float *a, const void *b, int64_t n, int dt) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), ld8(b, i, dt), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), ld8(b, i + 8, dt), s1);
    }
    float s = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * ld(b, i, dt);
    return s;
}

/* y[i] += a * x[i], y fp32, x in dt */
static inline void axpy(float *y, float a, const void *x, int64_t n, int dt) {
    __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, ld8(x, i, dt), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * ld(x, i, dt);
}

/* out[m] = w * round(x[m] / sqrt(mean(x[m]^2) + eps)), rows of H; the statistics in fp32
 * whatever the dtype (as the reference models compute them) */
void mf_rmsnorm(const void *x, const void *w, void *out, int64_t M, int64_t H, float eps, int dt) {
    for (int64_t m = 0; m < M; m++) {
        const int64_t at = m * H;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0;
        int64_t i = 0;
        for (; i + 16 <= H; i += 16) {
            __m256 a = ld8(x, at + i, dt), b = ld8(x, at + i + 8, dt);
            s0 = _mm256_fmadd_ps(a, a, s0);
            s1 = _mm256_fmadd_ps(b, b, s1);
        }
        float ss = hsum(_mm256_add_ps(s0, s1));
        for (; i < H; i++) {
            float v = ld(x, at + i, dt);
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
        for (i = 0; i < H; i++) st(out, at + i, dt, ld(w, i, dt) * round_to(ld(x, at + i, dt) * r, dt));
    }
}

/* One query head against its sequence's cache: keys [lo, L) of the group's K/V rows. */
static void head(const void *q, const char *K, const char *V, int64_t lo, int64_t L, int64_t d, int64_t dv,
                 int64_t row_bytes_k, int64_t row_bytes_v, float scale, float *qf, float *sc, float *acc,
                 void *out, int dt) {
    for (int64_t i = 0; i < d; i++) qf[i] = ld(q, i, dt) * scale;
    float mx = -INFINITY;
    for (int64_t j = lo; j < L; j++) {
        float s = dot(qf, K + j * row_bytes_k, d, dt);
        sc[j - lo] = s;
        if (s > mx) mx = s;
    }
    float sum = 0.f;
    for (int64_t j = lo; j < L; j++) sum += (sc[j - lo] = expf(sc[j - lo] - mx));
    memset(acc, 0, dv * sizeof(float));
    for (int64_t j = lo; j < L; j++) axpy(acc, sc[j - lo], V + j * row_bytes_v, dv, dt);
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < dv; i++) st(out, i, dt, acc[i] * inv);
}

/* Batch decode: row b's new token (q [B, h, d], k [B, kvh, d], v [B, kvh, dv]) is written at
 * position lens[b] - 1 of cache slot slots[b] (kc [slots, max_len, kvh, d], vc likewise with
 * dv), then attends to that slot's positions [lens[b] - window, lens[b]) (window <= 0: all);
 * query head i reads key/value head i / (h / kvh). out [B, h, dv].
 * Returns 0, -1 when a slot or length is out of range (nothing is written then), -2 when out
 * of memory. */
int mf_decode_attn(const void *q, const void *k, const void *v, void *kc, void *vc, const int64_t *slots,
                   const int64_t *lens, int64_t n_slots, int64_t B, int64_t h, int64_t kvh, int64_t d, int64_t dv,
                   int64_t max_len, int64_t window, float scale, void *out, int dt) {
    const int64_t es = dt == F32 ? 4 : 2, group = h / kvh;
    const int64_t krow = kvh * d * es, vrow = kvh * dv * es;  /* bytes of one cache position */
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) {
        if (slots[b] < 0 || slots[b] >= n_slots || lens[b] < 1 || lens[b] > max_len) return -1;
        if (lens[b] > longest) longest = lens[b];
    }
    /* (written before any head reads: a row's new key is in its own attention) */
    for (int64_t b = 0; b < B; b++) {
        const int64_t pos = slots[b] * max_len + lens[b] - 1;
        memcpy((char *)kc + pos * krow, (const char *)k + b * krow, krow);
        memcpy((char *)vc + pos * vrow, (const char *)v + b * vrow, vrow);
    }
    const int64_t per = d + dv + longest, work = B * h * longest * (d + dv);
    const int parallel = work > (1 << 18);
    float *scratch = malloc(sizeof(float) * per * (parallel ? omp_get_max_threads() : 1));
    if (!scratch) return -2;
#pragma omp parallel if (parallel)
    {
        float *buf = scratch + per * omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * h; bi++) {
            const int64_t b = bi / h, i = bi % h, g = i / group, L = lens[b];
            const int64_t lo = window > 0 && L > window ? L - window : 0;
            const char *K = (const char *)kc + slots[b] * max_len * krow + g * d * es;
            const char *V = (const char *)vc + slots[b] * max_len * vrow + g * dv * es;
            head((const char *)q + bi * d * es, K, V, lo, L, d, dv, krow, vrow, scale, buf, buf + d + dv,
                 buf + d, (char *)out + bi * dv * es, dt);
        }
    }
    free(scratch);
    return 0;
}

/* Rotary embedding, op for op as torch computes it (each product and sum rounded to the dtype,
 * no contraction: the build passes -ffp-contract=off), so the result is the same bits:
 * out = [x1 * c - x2 * s | x2 * c + x1 * s] per head, where (x1, x2) are the halves of the head
 * (interleaved = 0) or its even and odd elements (interleaved = 1; they come out de-interleaved).
 * x, out [T, heads, dim]; cos, sin [T, dim / 2]. */
void mf_rope(const void *x, const void *cos, const void *sin, void *out, int64_t T, int64_t heads, int64_t dim,
             int interleaved, int dt) {
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t hd = 0; hd < heads; hd++) {
            const int64_t at = (t * heads + hd) * dim;
            for (int64_t i = 0; i < half; i++) {
                const float c = ld(cos, t * half + i, dt), s = ld(sin, t * half + i, dt);
                const float x1 = ld(x, at + (interleaved ? 2 * i : i), dt);
                const float x2 = ld(x, at + (interleaved ? 2 * i + 1 : i + half), dt);
                st(out, at + i, dt, round_to(x1 * c, dt) - round_to(x2 * s, dt));
                st(out, at + i + half, dt, round_to(x2 * c, dt) + round_to(x1 * s, dt));
            }
        }
    }
}
