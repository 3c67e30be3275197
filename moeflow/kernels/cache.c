// One layer-step of an expert cache under the cyclic policy (moeflow/cache/policies.py, Cyclic),
// in one call: the engine asks once per MoE layer per decode step, and the same decisions taken
// in numpy cost 20-70 µs a call between the model's kernels (several numpy calls on a handful of
// keys each), against a couple of µs here.
//
// This is a twin of ExpertCache.request / .prefetch with a Cyclic policy (the test compares both
// on long traces): the same keys are evicted in the same order, and the decayed counts are
// computed with the same operations as numpy's logaddexp2, so they match bit for bit. The
// eviction ranks use libm's exp2, where numpy may use its own vectorised exp2 (1 ulp apart for
// ~5% of inputs on an AVX-512 machine): two candidates whose ranks lie within an ulp of each
// other could be ordered differently by the two paths (no such case in the tests' traces).
// Compiled without floating-point contraction, since a fused multiply-add would round
// differently from numpy.

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t L, E;                    // MoE layers, experts per layer
    int64_t per_layer, total_cap;    // exactly one is >= 0: the other is -1
    uint8_t *resident, *pending;     // [L*E] flags, shared with the Python cache
    uint8_t *protect;                // [L*E] scratch, all zero between calls
    int64_t *count;                  // [L] resident keys per layer
    int64_t *total;                  // [1] resident keys in all
    double *score;                   // [L*E] log2 of each key's decayed use count (Reuse.score)
    double half_life, full;          // Cyclic.half_life, Cyclic.full
    int64_t *cyc;                    // [2] Cyclic.layer, Cyclic.t: the last touch
    double *rank;                    // [L*E] scratch
    int64_t *keys;                   // [E] out: the request's distinct keys, first-seen order
    int64_t *loaded, *evicted;       // [L*E] out
    int64_t *res;                    // out: n keys, n loaded, n evicted, n first uses, n wasted
} mf_cache;

#define LOG2E 1.442695040888963407359924681001892137

static double logaddexp2(double x, double y) {  // as numpy's npy_logaddexp2
    if (x == y) return x + 1;
    double tmp = x - y;
    if (tmp > 0) return x + LOG2E * log1p(exp2(-tmp));
    if (tmp <= 0) return y + LOG2E * log1p(exp2(tmp));
    return tmp;
}

static double priority(const mf_cache *c, int64_t k) {  // Cyclic.priority, one key
    int64_t L = c->L, ahead = (k / c->E - (c->cyc[0] + 1)) % L;
    if (ahead < 0) ahead += L;
    double r = c->score[k];
    r -= (double)c->cyc[1] / c->half_life;
    r -= c->full;
    if (r > 0.0) r = 0.0;
    if (r < -60.0) r = -60.0;
    r = exp2(-r);
    r -= 1.0;
    r *= (double)L;
    r += (double)ahead;
    return -r;
}

// the distinct valid keys of ids (-1 = unused) into c->keys; -1 with res[0] = the bad id
static int64_t distinct(mf_cache *c, int64_t layer, const int64_t *ids, int64_t n) {
    int64_t m = 0, base = layer * c->E;
    for (int64_t i = 0; i < n; i++) {
        int64_t e = ids[i];
        if (e >= c->E) {
            c->res[0] = e;
            return -1;
        }
        if (e < 0) continue;
        int64_t k = base + e, seen = 0;
        for (int64_t j = 0; j < m; j++) seen |= c->keys[j] == k;
        if (!seen) c->keys[m++] = k;
    }
    return m;
}

static int better(double ra, int64_t a, double rb, int64_t b) {  // (rank, key) order
    return ra < rb || (ra == rb && a < b);
}

// evicts the `need` lowest-ranked keys among the resident, unprotected ones (of `layer` for a
// per-layer cache), ties to the lower key; writes them in key order to c->evicted
static int64_t evict(mf_cache *c, int64_t layer, int64_t need) {
    int64_t lo = 0, hi = c->L * c->E;
    if (c->per_layer >= 0) lo = layer * c->E, hi = lo + c->E;
    int64_t n = 0;
    for (int64_t k = lo; k < hi; k++)
        if (c->resident[k] && !c->protect[k]) c->rank[k] = priority(c, k), c->loaded[c->res[1] + n++] = k;
    int64_t *cand = c->loaded + c->res[1];  // (the free tail of `loaded` as scratch)
    int64_t got = 0;
    for (; got < need && got < n; got++) {  // a partial selection: need is a few keys
        int64_t best = got;
        for (int64_t i = got + 1; i < n; i++)
            if (better(c->rank[cand[i]], cand[i], c->rank[cand[best]], cand[best])) best = i;
        int64_t t = cand[got];
        cand[got] = cand[best], cand[best] = t;
    }
    for (int64_t i = 1; i < got; i++)  // the victims in key order
        for (int64_t j = i; j > 0 && cand[j - 1] > cand[j]; j--) {
            int64_t t = cand[j];
            cand[j] = cand[j - 1], cand[j - 1] = t;
        }
    for (int64_t i = 0; i < got; i++) {
        int64_t k = cand[i];
        c->evicted[i] = k;
        c->resident[k] = 0;
        if (c->pending[k]) c->pending[k] = 0, c->res[4]++;  // a prefetch never used
        c->count[k / c->E]--;
    }
    c->total[0] -= got;
    return got;
}

// makes room for `incoming` new keys of `layer`, never evicting a protected key; -3 when too few
// keys may go (the callers' fit checks rule that out)
static int make_room(mf_cache *c, int64_t layer, int64_t incoming) {
    int64_t need = c->per_layer >= 0 ? c->count[layer] + incoming - c->per_layer
                                     : c->total[0] + incoming - c->total_cap;
    c->res[2] = need > 0 ? evict(c, layer, need) : 0;
    return need > 0 && c->res[2] < need ? -3 : 0;
}

static void insert(mf_cache *c, int64_t layer, int64_t n) {
    for (int64_t i = 0; i < n; i++) c->resident[c->loaded[i]] = 1;
    c->count[layer] += n;
    c->total[0] += n;
}

static int64_t cap_size(const mf_cache *c) { return c->per_layer >= 0 ? c->per_layer : c->total_cap; }

// layer `layer` of token t runs on experts ids[n]: all become resident. Returns 0; -1 for an id
// out of range (res[0]), -2 when the keys do not fit (res[0] = how many), -4 for a layer out of
// range.
int mf_cache_request(mf_cache *c, int64_t layer, const int64_t *ids, int64_t n, int64_t t) {
    if (layer < 0 || layer >= c->L) return -4;
    int64_t m = distinct(c, layer, ids, n);
    if (m < 0) return -1;
    c->res[0] = m, c->res[4] = 0;
    if (m > cap_size(c)) return -2;
    int64_t n_new = 0, first = 0;
    for (int64_t i = 0; i < m; i++) {
        int64_t k = c->keys[i];
        if (!c->resident[k]) c->loaded[n_new++] = k;
        first += c->pending[k];
    }
    c->res[1] = n_new;
    for (int64_t i = 0; i < m; i++) c->protect[c->keys[i]] = 1;
    int rc = make_room(c, layer, n_new);
    for (int64_t i = 0; i < m; i++) c->protect[c->keys[i]] = 0;
    if (rc) return rc;
    insert(c, layer, n_new);
    double now = (double)t / c->half_life;
    for (int64_t i = 0; i < m; i++) {
        int64_t k = c->keys[i];
        c->pending[k] = 0;
        c->score[k] = logaddexp2(c->score[k], now);
    }
    if (m) c->cyc[0] = c->keys[0] / c->E, c->cyc[1] = t;
    c->res[3] = first;
    return 0;
}

// brings experts ids[n] of `layer` in ahead of their use, never evicting them nor protect[np];
// the same returns as mf_cache_request (-2: res[0] = keys that must fit together; -4 also for a
// protected key out of range)
int mf_cache_prefetch(mf_cache *c, int64_t layer, const int64_t *ids, int64_t n, const int64_t *protect,
                      int64_t np) {
    if (layer < 0 || layer >= c->L) return -4;
    for (int64_t i = 0; i < np; i++)
        if (protect[i] < 0 || protect[i] >= c->L * c->E) return -4;
    int64_t m = distinct(c, layer, ids, n);
    if (m < 0) return -1;
    for (int64_t i = 0; i < m; i++) c->protect[c->keys[i]] = 1;
    int64_t held = m;  // what must fit together: per layer, only this layer's keys compete
    for (int64_t i = 0; i < np; i++) {
        int64_t p = protect[i];
        held += (c->per_layer < 0 || p / c->E == layer) && !c->protect[p];
        c->protect[p] = 1;
    }
    int64_t n_new = 0;
    int rc = 0;
    if (held <= cap_size(c)) {
        for (int64_t i = 0; i < m; i++)
            if (!c->resident[c->keys[i]]) c->loaded[n_new++] = c->keys[i];
        c->res[1] = n_new, c->res[4] = 0;
        rc = make_room(c, layer, n_new);
    }
    for (int64_t i = 0; i < m; i++) c->protect[c->keys[i]] = 0;
    for (int64_t i = 0; i < np; i++) c->protect[protect[i]] = 0;
    if (held > cap_size(c)) {
        c->res[0] = held;
        return -2;
    }
    if (rc) return rc;
    insert(c, layer, n_new);
    for (int64_t i = 0; i < n_new; i++) c->pending[c->loaded[i]] = 1;
    c->res[0] = m, c->res[3] = 0;
    return 0;
}
