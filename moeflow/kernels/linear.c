/* Y[M, N] = X[M, K] @ W[N, K]^T for small M (decode, and per-expert blocks of prefill) on x86.
 *
 * Weights are fp32, bf16 or fp16 and are read from memory once: each thread streams its band of
 * rows and widens 16-bit values to fp32 in registers; activations and results are fp32.
 * Tiles: 4 rows x 1 token when M == 1, 2 rows x 4 tokens otherwise (the wrapper pads M to a
 * multiple of 4), eight accumulators either way so FMA latency is hidden.
 * bf16 is widened 16 values at a time by interleaving with zeros, which leaves them in the
 * order [0-3, 8-11 | 4-7, 12-15]; x is permuted the same way once per call, and a dot product
 * does not care about order.
 * Built with -fopenmp: loaded into a process that already has torch's libgomp.so.1 it shares
 * torch's thread pool rather than competing with it. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline void load16(const void *w, int64_t i, int dt, __m256 *lo, __m256 *hi) {
    if (dt == F32) {
        const float *f = (const float *)w + i;
        *lo = _mm256_loadu_ps(f);
        *hi = _mm256_loadu_ps(f + 8);
    } else if (dt == F16) {
        const uint16_t *h = (const uint16_t *)w + i;
        *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
        *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8)));
    } else {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
        __m256i z = _mm256_setzero_si256();
        *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
        *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
    }
}

static inline float load1(const void *w, int64_t i, int dt) {
    if (dt == F32) return ((const float *)w)[i];
    uint16_t v = ((const uint16_t *)w)[i];
    if (dt == F16) return _cvtsh_ss(v);
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* scalar tail over k in [k0, K): x is in original order there */
static inline float tail(const void *w, int64_t row, const float *x, int64_t k0, int64_t K, int dt) {
    float s = 0.f;
    for (int64_t k = k0; k < K; k++) s += load1(w, row * K + k, dt) * x[k];
    return s;
}

#define FMA2(acc0, acc1, wl, wh, xp) \
    acc0 = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xp), acc0); \
    acc1 = _mm256_fmadd_ps(wh, _mm256_loadu_ps((xp) + 8), acc1)

/* one weight row against one activation row, four accumulators over 32 values a step */
static inline float dot1(const void *w, int64_t n, const float *x, int64_t K, int64_t K16, int dt) {
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, wl, wh;
    int64_t k = 0;
    for (; k + 32 <= K16; k += 32) {
        load16(w, n * K + k, dt, &wl, &wh); FMA2(a0, b0, wl, wh, x + k);
        load16(w, n * K + k + 16, dt, &wl, &wh); FMA2(a1, b1, wl, wh, x + k + 16);
    }
    if (k < K16) {
        load16(w, n * K + k, dt, &wl, &wh); FMA2(a0, b0, wl, wh, x + k);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1))) + tail(w, n, x, K16, K, dt);
}

/* rows at least this long are read one after another: four rows read side by side are four
 * memory streams per thread, which capped a 2-vCPU Zen 4 at ~19 GB/s against ~30 GB/s for
 * one stream (bf16, K = 576 and 1024); shorter rows (a small expert's down projection) are one
 * contiguous block either way, and side by side they hide FMA latency better */
#define ROW_BY_ROW_MIN_K 256

/* four weight rows [n, n+4) against one activation row -> y[0..3] */
static inline void dot4(const void *w, int64_t n, const float *x, float *y, int64_t K, int64_t K16, int dt) {
    if (K >= ROW_BY_ROW_MIN_K) {
        for (int r = 0; r < 4; r++) y[r] = dot1(w, n + r, x, K, K16, dt);
        return;
    }
    __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
    __m256 wl, wh;
    for (int64_t k = 0; k < K16; k += 16) {
        load16(w, (n + 0) * K + k, dt, &wl, &wh); FMA2(a0, b0, wl, wh, x + k);
        load16(w, (n + 1) * K + k, dt, &wl, &wh); FMA2(a1, b1, wl, wh, x + k);
        load16(w, (n + 2) * K + k, dt, &wl, &wh); FMA2(a2, b2, wl, wh, x + k);
        load16(w, (n + 3) * K + k, dt, &wl, &wh); FMA2(a3, b3, wl, wh, x + k);
    }
    y[0] = hsum(_mm256_add_ps(a0, b0)) + tail(w, n + 0, x, K16, K, dt);
    y[1] = hsum(_mm256_add_ps(a1, b1)) + tail(w, n + 1, x, K16, K, dt);
    y[2] = hsum(_mm256_add_ps(a2, b2)) + tail(w, n + 2, x, K16, K, dt);
    y[3] = hsum(_mm256_add_ps(a3, b3)) + tail(w, n + 3, x, K16, K, dt);
}

static void tile_4x1(const void *w, int64_t n, const float *x, float *y, int64_t K, int64_t K16, int dt) {
    dot4(w, n, x, y + n, K, K16, dt);
}

static void tile_2x4(const void *w, int64_t n, const float *X, float *Y, int64_t m, int64_t N, int64_t K,
                     int64_t K16, int dt) {
    __m256 acc[2][4];
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < 4; t++) acc[r][t] = _mm256_setzero_ps();
    const float *x0 = X + (m + 0) * K, *x1 = X + (m + 1) * K, *x2 = X + (m + 2) * K, *x3 = X + (m + 3) * K;
    __m256 l0, h0, l1, h1;
    for (int64_t k = 0; k < K16; k += 16) {
        load16(w, (n + 0) * K + k, dt, &l0, &h0);
        load16(w, (n + 1) * K + k, dt, &l1, &h1);
        __m256 xl, xh;
#define TOKEN(t, xp) \
        xl = _mm256_loadu_ps((xp) + k); xh = _mm256_loadu_ps((xp) + k + 8); \
        acc[0][t] = _mm256_fmadd_ps(h0, xh, _mm256_fmadd_ps(l0, xl, acc[0][t])); \
        acc[1][t] = _mm256_fmadd_ps(h1, xh, _mm256_fmadd_ps(l1, xl, acc[1][t]))
        TOKEN(0, x0); TOKEN(1, x1); TOKEN(2, x2); TOKEN(3, x3);
#undef TOKEN
    }
    const float *xs[4] = {x0, x1, x2, x3};
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < 4; t++)
            Y[(m + t) * N + n + r] = hsum(acc[r][t]) + tail(w, n + r, xs[t], K16, K, dt);
}

/* one weight row n against tokens [m, m+4): a single weight stream (see ROW_BY_ROW_MIN_K),
 * two accumulators per token */
static void tile_1x4(const void *w, int64_t n, const float *X, float *Y, int64_t m, int64_t N, int64_t K,
                     int64_t K16, int dt) {
    __m256 lo[4], hi[4], wl, wh;
    for (int t = 0; t < 4; t++) lo[t] = hi[t] = _mm256_setzero_ps();
    const float *xs[4] = {X + (m + 0) * K, X + (m + 1) * K, X + (m + 2) * K, X + (m + 3) * K};
    for (int64_t k = 0; k < K16; k += 16) {
        load16(w, n * K + k, dt, &wl, &wh);
        for (int t = 0; t < 4; t++) {
            lo[t] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xs[t] + k), lo[t]);
            hi[t] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xs[t] + k + 8), hi[t]);
        }
    }
    for (int t = 0; t < 4; t++) Y[(m + t) * N + n] = hsum(_mm256_add_ps(lo[t], hi[t])) + tail(w, n, xs[t], K16, K, dt);
}

/* rows n, n+1 against tokens [m, m+4): one after another for long 16-bit rows (bf16, 4 tokens,
 * 1024 x 1024: 10.3 -> 14.4 GB/s on the Zen 4 host), side by side otherwise (fp32 rows measured
 * 10% faster side by side there, two rows of fp32 being the same bytes as four of bf16) */
static void pair_x4(const void *w, int64_t n, const float *X, float *Y, int64_t m, int64_t N, int64_t K,
                    int64_t K16, int dt) {
    if (K >= ROW_BY_ROW_MIN_K && dt != F32) {
        tile_1x4(w, n, X, Y, m, N, K, K16, dt);
        tile_1x4(w, n + 1, X, Y, m, N, K, K16, dt);
    } else {
        tile_2x4(w, n, X, Y, m, N, K, K16, dt);
    }
}

static void row_generic(const void *w, int64_t n, const float *X, float *Y, int64_t M, int64_t N, int64_t K,
                        int64_t K16, int dt) {
    for (int64_t m = 0; m < M; m++) {
        const float *x = X + m * K;
        __m256 a = _mm256_setzero_ps(), b = a, wl, wh;
        for (int64_t k = 0; k < K16; k += 16) {
            load16(w, n * K + k, dt, &wl, &wh);
            FMA2(a, b, wl, wh, x + k);
        }
        Y[m * N + n] = hsum(_mm256_add_ps(a, b)) + tail(w, n, x, K16, K, dt);
    }
}

/* bf16 lanes come out as [0-3, 8-11 | 4-7, 12-15]: give x the same order within each 16 */
static float *permute_for_bf16(const float *X, int64_t M, int64_t K, int64_t K16) {
    float *p = (float *)malloc(sizeof(float) * M * K);
    for (int64_t m = 0; m < M; m++) {
        const float *x = X + m * K;
        float *q = p + m * K;
        for (int64_t k = 0; k < K16; k += 16) {
            memcpy(q + k, x + k, 16);
            memcpy(q + k + 4, x + k + 8, 16);
            memcpy(q + k + 8, x + k + 4, 16);
            memcpy(q + k + 12, x + k + 12, 16);
        }
        memcpy(q + K16, x + K16, sizeof(float) * (K - K16));
    }
    return p;
}

/* M must be 1 or a multiple of 4 for the tiled path; other M go row by row */
void mf_linear(const void *W, const float *X, float *Y, int64_t M, int64_t N, int64_t K, int dt) {
    int64_t K16 = K / 16 * 16;
    float *xp = dt == BF16 ? permute_for_bf16(X, M, K, K16) : NULL;
    const float *x = xp ? xp : X;
    if (M == 1) {
        int64_t n4 = N / 4 * 4;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < n4; n += 4) tile_4x1(W, n, x, Y, K, K16, dt);
        for (int64_t n = n4; n < N; n++) row_generic(W, n, x, Y, 1, N, K, K16, dt);
    } else if (M % 4 == 0) {
        int64_t n2 = N / 2 * 2;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < n2; n += 2)
            for (int64_t m = 0; m < M; m += 4) pair_x4(W, n, x, Y, m, N, K, K16, dt);
        for (int64_t n = n2; n < N; n++) row_generic(W, n, x, Y, M, N, K, K16, dt);
    } else {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) row_generic(W, n, x, Y, M, N, K, K16, dt);
    }
    free(xp);
}

static inline int64_t bf16_lane(int64_t q, int64_t n16) {
    /* where the value for permuted position q comes from (see permute_for_bf16) */
    if (q >= n16) return q;
    int64_t base = q & ~15, o = q & 15;
    return base + (o < 4 ? o : o < 8 ? o + 4 : o < 12 ? o - 4 : o);
}

static inline float silu(float g) { return g / (1.f + __builtin_expf(-g)); }

/* act[p, :] = silu(gate) * up from hbuf[p] = [gate | up] for rows p < P, work shared by the
 * calling team; for bf16 weights act comes out in the permuted lane order the down
 * projection expects */
static void swiglu_rows(const float *hbuf, float *act, int64_t P, int64_t I, int dt) {
    int64_t I16 = I / 16 * 16;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < P * I; q++) {
        int64_t p = q / I, i = q - p * I;
        int64_t src = dt == BF16 ? bf16_lane(i, I16) : i;
        const float *h = hbuf + p * 2 * I;
        act[q] = silu(h[src]) * h[I + src];
    }
}

/* The activations silu(G_e x) * U_e x of the m experts listed in sel (indices into w13; NULL: the
 * first m) into act [m, I], where W13_e = [G_e; U_e] is [2I, H]. Called from inside a parallel
 * region, whose team shares the rows. Requires 2I and H multiples of 4; hbuf holds m*2I floats. */
static void gate_up(int64_t m, const int64_t *sel, const void **w13, const float *x, float *hbuf, float *act,
                    int64_t H, int64_t I, int dt) {
    int64_t H16 = H / 16 * 16, I2 = 2 * I;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m * I2; r += 4) {
        int64_t s = r / I2;
        tile_4x1(w13[sel ? sel[s] : s], r - s * I2, x, hbuf + s * I2, H, H16, dt);
    }
    swiglu_rows(hbuf, act, m, I, dt);
}

/* The listed experts' unweighted outputs y[e*H .. e*H+H) = W2_e act_e (W2_e is [H, I]): their
 * activations (gate_up), then this thread's band [lo, hi) of each down projection. */
static void experts_part(int64_t m, const int64_t *sel, const void **w13, const void **w2, const float *x,
                         float *y, float *hbuf, float *act, int64_t lo, int64_t hi, int64_t H, int64_t I,
                         int dt) {
    int64_t I16 = I / 16 * 16;
    gate_up(m, sel, w13, x, hbuf, act, H, I, dt);
    for (int64_t s = 0; s < m; s++) {
        int64_t e = sel ? sel[s] : s;
        for (int64_t j = lo; j < hi; j += 4) dot4(w2[e], j, act + s * I, y + e * H + j, I, I16, dt);
    }
}

/* this thread's band of output rows: whole blocks of four */
static void band(int64_t H, int64_t *lo, int64_t *hi) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t blocks = H / 4;
    *lo = blocks * t / nt * 4;
    *hi = blocks * (t + 1) / nt * 4;
}

/* out[j] = sum_e scale[e] * y[e*H + j] for j in [lo, hi), in expert order and with the same
 * fused multiply-adds as mf_moe_token: the sum is bit for bit its sum, whichever experts were
 * computed first */
static void weighted_sum(int64_t n, const float *restrict scale, const float *restrict y, float *restrict out,
                         int64_t lo, int64_t hi, int64_t H) {
    for (int64_t j = lo; j < hi; j++) out[j] = 0.f;
    for (int64_t e = 0; e < n; e++)
        for (int64_t j = lo; j < hi; j++) out[j] = fmaf(scale[e], y[e * H + j], out[j]);
}

/* out[j] = sum_e scale[e] * (W2_e act_e)[j] over this thread's band [lo, hi), expert by expert in
 * order: each expert's dot products, then one fused multiply-add each (what weighted_sum adds up
 * when the experts' outputs are kept apart) */
static void weighted_down(int64_t n, const void **w2, const float *scale, const float *act, float *out,
                          int64_t lo, int64_t hi, int64_t I, int dt) {
    int64_t I16 = I / 16 * 16;
    for (int64_t j = lo; j < hi; j++) out[j] = 0.f;
    for (int64_t e = 0; e < n; e++) {
        float y[4];
        for (int64_t j = lo; j < hi; j += 4) {
            dot4(w2[e], j, act + e * I, y, I, I16, dt);
            for (int r = 0; r < 4; r++) out[j + r] = fmaf(scale[e], y[r], out[j + r]);
        }
    }
}

/* One SwiGLU block's activations silu(G x) * U x into act [I], the gate and up projections
 * separate [I, H] matrices (hbuf: the gate rows, then the up rows, 2I floats); inside a parallel
 * region, whose team shares the rows. Requires I and H multiples of 4. */
static void mlp_act(const void *gate, const void *up, const float *x, float *hbuf, float *act, int64_t H,
                    int64_t I, int dt) {
    int64_t H16 = H / 16 * 16;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < 2 * I; r += 4) {
        if (r < I) tile_4x1(gate, r, x, hbuf, H, H16, dt);
        else tile_4x1(up, r - I, x, hbuf + I, H, H16, dt);
    }
    swiglu_rows(hbuf, act, 1, I, dt);
}

/* One token through n experts: out[H] = sum_e scale[e] * W2_e (silu(G_e x) * U_e x). One
 * parallel region for the whole layer: gate/up rows of every expert, then the activations,
 * then each thread sums the down projections of all experts over its own band of output rows
 * (no reduction across threads). hbuf holds n*2I floats, act n*I. */
void mf_moe_token(int64_t n, const void **w13, const void **w2, const float *scale, const float *x_in,
                  float *out, float *hbuf, float *act, int64_t H, int64_t I, int dt) {
    float *xp = dt == BF16 ? permute_for_bf16(x_in, 1, H, H / 16 * 16) : NULL;
    const float *x = xp ? xp : x_in;
#pragma omp parallel
    {
        gate_up(n, NULL, w13, x, hbuf, act, H, I, dt);
        int64_t lo, hi;
        band(H, &lo, &hi);
        weighted_down(n, w2, scale, act, out, lo, hi, I, dt);
    }
    free(xp);
}

/* A dense SwiGLU FFN or shared expert for one token: out[H] = W2 (silu(G x) * U x), the gate
 * and up projections separate [I, H] matrices. The same arithmetic as mf_moe_token with one
 * expert of weight 1 (hbuf holds the gate rows, then the up rows), without a fused copy of G and
 * U. hbuf holds 2I floats, act I. */
void mf_mlp_token(const void *gate, const void *up, const void *w2, const float *x_in, float *out, float *hbuf,
                  float *act, int64_t H, int64_t I, int dt) {
    int64_t I16 = I / 16 * 16;
    float *xp = dt == BF16 ? permute_for_bf16(x_in, 1, H, H / 16 * 16) : NULL;
    const float *x = xp ? xp : x_in;
#pragma omp parallel
    {
        mlp_act(gate, up, x, hbuf, act, H, I, dt);
        int64_t lo, hi;
        band(H, &lo, &hi);
        for (int64_t j = lo; j < hi; j += 4) dot4(w2, j, act, out + j, I, I16, dt);
    }
    free(xp);
}

/* The [gate | up] and down addresses of experts ids[0..k) in a layer buffer whose expert e starts
 * at base + e*stride elements, its down projection `down_at` elements further */
static void expert_addresses(int64_t k, const int64_t *ids, const void *base, int64_t stride, int64_t down_at,
                             int dt, const void **w13, const void **w2) {
    int64_t es = dt == F32 ? 4 : 2;
    for (int64_t s = 0; s < k; s++) {
        w13[s] = (const char *)base + ids[s] * stride * es;
        w2[s] = (const char *)base + (ids[s] * stride + down_at) * es;
    }
}

/* The k largest of logits[0..E) into ids, best first, ordered as a stable descending sort
 * orders them (routing.topk_sum): NaN above every number, ties to the lower index */
static void top_ids(const float *logits, int64_t E, int64_t k, int64_t *ids) {
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t t = 0; t < j; t++) taken |= ids[t] == e;
            if (taken) continue;
            float a = logits[e];
            if (best < 0) {
                best = e;
                continue;
            }
            float b = logits[best];
            if (isnan(a) ? !isnan(b) : a > b) best = e;
        }
        ids[j] = best;
    }
}

/* A whole MoE layer for one token whose experts all sit in one buffer (a resident store's layer:
 * expert e at base + e*stride elements, [gate | up] rows then the down projection): the k routed
 * experts ids[0..k) weighted by scale, and the shared expert (gate, up [Is, H], down [H, Is]; sg
 * NULL for none), in one parallel region instead of a call each. The routed sum is mf_moe_token's
 * and the shared expert's output mf_mlp_token's, bit for bit; the shared output goes to
 * shared_out when given (its caller rounds or gates it), else it is added to out after the
 * routed sum, as `routed + shared` in fp32. hbuf holds k*2I + 2Is floats, act k*I + Is.
 * With router (fp32 [E, H]; else NULL) the layer routes too: logits[0..E) = router x as mf_linear
 * computes them for one token, bit for bit, and ids gets their top k, best first. */
void mf_moe_layer_token(int64_t k, int64_t *ids, const float *scale, const void *base, int64_t stride,
                        const void *sg, const void *su, const void *sd, int64_t Is, const float *x_in, float *out,
                        float *shared_out, float *hbuf, float *act, int64_t H, int64_t I, int dt,
                        const float *router, int64_t E, float *logits) {
    int64_t H16 = H / 16 * 16, Is16 = Is / 16 * 16, E4 = E / 4 * 4;
    float *xp = dt == BF16 ? permute_for_bf16(x_in, 1, H, H16) : NULL;
    const float *x = xp ? xp : x_in;
    const void *w13[k], *w2[k];
    if (!router) expert_addresses(k, ids, base, stride, 2 * I * H, dt, w13, w2);
    float *hs = hbuf + k * 2 * I, *as = act + k * I;
#pragma omp parallel
    {
        if (router) {
#pragma omp for schedule(static)
            for (int64_t n = 0; n < E4; n += 4) tile_4x1(router, n, x_in, logits, H, H16, F32);
#pragma omp single
            {
                for (int64_t n = E4; n < E; n++) row_generic(router, n, x_in, logits, 1, E, H, H16, F32);
                top_ids(logits, E, k, ids);
                expert_addresses(k, ids, base, stride, 2 * I * H, dt, w13, w2);
            }
        }
        gate_up(k, NULL, w13, x, hbuf, act, H, I, dt);
        if (sg) mlp_act(sg, su, x, hs, as, H, Is, dt);
        int64_t lo, hi;
        band(H, &lo, &hi);
        weighted_down(k, w2, scale, act, out, lo, hi, I, dt);
        if (sg) {
            float y[4];
            for (int64_t j = lo; j < hi; j += 4) {
                dot4(sd, j, as, y, Is, Is16, dt);
                for (int r = 0; r < 4; r++) {
                    if (shared_out) shared_out[j + r] = y[r];
                    else out[j + r] = out[j + r] + y[r];
                }
            }
        }
    }
    free(xp);
}

/* mf_moe_token in two calls, for a layer whose experts are not all in memory yet: the first
 * computes the m experts listed in sel (those that are) into y [n, H] while the others are read;
 * the last (scale not NULL) computes the rest and sums all n. Each expert's output and the sum
 * are computed as by mf_moe_token, so the result is bit for bit the same. */
void mf_moe_token_part(int64_t n, int64_t m, const int64_t *sel, const void **w13, const void **w2,
                       const float *scale, const float *x_in, float *out, float *y, float *hbuf, float *act,
                       int64_t H, int64_t I, int dt) {
    float *xp = dt == BF16 ? permute_for_bf16(x_in, 1, H, H / 16 * 16) : NULL;
    const float *x = xp ? xp : x_in;
#pragma omp parallel
    {
        int64_t lo, hi;
        band(H, &lo, &hi);
        if (m) experts_part(m, sel, w13, w2, x, y, hbuf, act, lo, hi, H, I, dt);
        if (scale) weighted_sum(n, scale, y, out, lo, hi, H);  /* (its own band: no barrier) */
    }
    free(xp);
}

/* rows [n, n+4) against mb (1-3) activation rows: each weight chunk is widened once and used
 * for every token; 12 accumulators + 2 weight + 2 x registers fit AVX2's sixteen */
static inline __attribute__((always_inline)) void tile_4xm(const void *w, int64_t n, const float *X, float *Y,
                                                          const int mb, int64_t N, int64_t K, int64_t K16, int dt) {
    __m256 acc[4][3];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 3; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) {
        for (int r = 0; r < 4; r++) {
            __m256 wl, wh;
            load16(w, (n + r) * K + k, dt, &wl, &wh);
            for (int t = 0; t < mb; t++) {
                const float *x = X + t * K + k;
                acc[r][t] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(x + 8), _mm256_fmadd_ps(wl, _mm256_loadu_ps(x), acc[r][t]));
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < mb; t++) Y[t * N + n + r] = hsum(acc[r][t]) + tail(w, n + r, X + t * K, K16, K, dt);
}

/* rows [n, n+4) of w against M activation rows X[M, K] -> Y[m * N + n + r] */
static void rows4_all_tokens(const void *w, int64_t n, const float *X, float *Y, int64_t M, int64_t N, int64_t K,
                             int64_t K16, int dt) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
        pair_x4(w, n, X, Y, m, N, K, K16, dt);
        pair_x4(w, n + 2, X, Y, m, N, K, K16, dt);
    }
    switch (M - m) {
    case 1: tile_4xm(w, n, X + m * K, Y + m * N, 1, N, K, K16, dt); break;
    case 2: tile_4xm(w, n, X + m * K, Y + m * N, 2, N, K, K16, dt); break;
    case 3: tile_4xm(w, n, X + m * K, Y + m * N, 3, N, K, K16, dt); break;
    default: break;
    }
}

/* Many tokens through their experts, grouped: expert g owns pair rows [off[g], off[g+1]) of
 * Xs [P, H] (tokens gathered per expert). Y[P, H] = W2_g (silu(G_g x) * U_g x) for each pair,
 * unweighted; the caller scales and scatters. Each weight row is read once per call and reused
 * for all of its expert's tokens. hbuf holds P*2I floats, act P*I. Needs H % 4 == 0, I even. */
void mf_moe_grouped(int64_t n_groups, const void **w13, const void **w2, const int64_t *off, const float *Xs_in,
                    float *hbuf, float *act, float *Y, int64_t P, int64_t H, int64_t I, int dt) {
    int64_t H16 = H / 16 * 16, I16 = I / 16 * 16, I2 = 2 * I;
    float *xp = dt == BF16 ? permute_for_bf16(Xs_in, P, H, H16) : NULL;
    const float *Xs = xp ? xp : Xs_in;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t it = 0; it < n_groups * (I2 / 4); it++) {
            int64_t g = it / (I2 / 4), r = 4 * (it - g * (I2 / 4));
            rows4_all_tokens(w13[g], r, Xs + off[g] * H, hbuf + off[g] * I2, off[g + 1] - off[g], I2, H, H16, dt);
        }
        swiglu_rows(hbuf, act, P, I, dt);
#pragma omp for schedule(static)
        for (int64_t it = 0; it < n_groups * (H / 4); it++) {
            int64_t g = it / (H / 4), j = 4 * (it - g * (H / 4));
            rows4_all_tokens(w2[g], j, act + off[g] * I, Y + off[g] * H, off[g + 1] - off[g], H, I, I16, dt);
        }
    }
    free(xp);
}

/* The k largest of w [E, H] (fp32) . x [H] (+ bias), best first (ties: the lower index): a
   prefetch look-ahead's guess for one decode token, in one call instead of four torch ops. */
void mf_topk_logits(const void *x_in, int xdt, const float *w, const float *bias, int64_t E, int64_t H,
                    int64_t k, int64_t *out, float *scratch /* [H + E] */) {
    float *x = scratch, *logit = scratch + H;
    for (int64_t i = 0; i < H; i++) x[i] = load1(x_in, i, xdt);
    int64_t H8 = H & ~(int64_t)7;
    for (int64_t e = 0; e < E; e++) {
        const float *r = w + e * H;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < H8; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), acc);
        float s = hsum(acc);
        for (int64_t i = H8; i < H; i++) s += r[i] * x[i];
        logit[e] = bias ? s + bias[e] : s;
    }
    for (int64_t j = 0; j < k && j < E; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (logit[e] == logit[e] && (best < 0 || logit[e] > logit[best])) best = e;  // (NaN: skipped)
        if (best < 0) best = j;  // (NaN logits: any id will do, a guess never changes an output)
        out[j] = best;
        logit[best] = NAN;  // taken
    }
}
