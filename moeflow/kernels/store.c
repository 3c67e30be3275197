// One MoE layer's store step in one call, for store/aio_native.py: the cache decision (cache.c's
// cyclic policy, called through the pointers it is given), slots for the keys it loads, their
// O_DIRECT reads submitted through Linux AIO straight into the slots, completions taken without
// waiting, and each expert's weight addresses for the fused kernel. The same steps in Python
// (store/aio_direct.py) cost ~4 ms of a 29 ms token at a 25% budget on the 2-vCPU host, between
// the model's kernels: dozens of small calls a layer (BENCHMARKS.md, tiered expert store).
//
// Every expert is one run of the checkpoint, read as the page-aligned span around it (in reads of
// at most `chunk` bytes) from the start of its slot, so the kernel writes the slot itself: a key
// evicted while its reads are in flight keeps its slot until they land.

#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ALIGN 4096
#define AIO_RING_MAGIC 0xa10a10a1u

typedef int (*request_fn)(void *cache, int64_t layer, const int64_t *ids, int64_t n, int64_t t);
typedef int (*prefetch_fn)(void *cache, int64_t layer, const int64_t *ids, int64_t n, const int64_t *protect,
                           int64_t np);

// DEMAND_NS: time spent submitting demand misses' reads (the Python store counts it as stall)
enum { ACCESSES, HITS, MISSES, PREFETCH_HITS, EVICTIONS, WASTED, PREFETCHES, DEMAND_LOADS, BYTES_READ, DEMAND_NS,
       N_COUNT };

typedef struct {
    void *cache;  // cache.c's mf_cache, and its request and prefetch
    request_fn request;
    prefetch_fn prefetch;
    int64_t *c_loaded, *c_evicted, *c_res;  // the cache's out arrays
    int64_t E, n_keys;                      // experts per layer, L * E
    uint64_t base;                          // slot 0's address; slot i at base + i * stride
    int64_t stride, gate_at, down_at;       // bytes: a slot; [gate | up] and down from the run's start
    int64_t *slot_of;                       // [n_keys] its slot, -1 while not resident
    int64_t *free_slots, n_free;            // a stack of unused slots
    int32_t *fd;                            // [n_keys] where each key's run lies: O_DIRECT descriptor,
    int64_t *run_off, *run_len;             //   file offset and length
    int64_t chunk;                          // the longest single read
    int32_t *pending;                       // [n_keys] its reads in flight
    int64_t *failed;                        // [n_keys] 0; -errno; or 1 + run bytes read (a short read)
    uint64_t ctx;                           // the AIO context (also its completion ring's address)
    int64_t depth, in_flight;
    struct iocb *cbs;                       // [depth]
    struct iocb **batch;                    // [depth] reads prepared, not yet submitted
    struct io_event *events;                // [depth]
    int64_t *cb_free, n_cb_free;            // a stack of control blocks not in flight
    int64_t *cb_key, *cb_hi;                // [depth] the key a block reads, where its run bytes end
    int64_t *in_use, n_in_use;              // the keys of the last fetch: a prefetch never evicts them
    int64_t err_key, err_val;               // out: which key failed, and how (as `failed`; errno for -11)
    int64_t count[N_COUNT];                 // counters the Python side folds into its statistics
    // fault injection for the tests, at the kernel's boundary: the next submission refused with
    // this errno; the next completion taken reports this errno; until then (or for good, without
    // fail_read) looks for completions without waiting find none
    int64_t fail_submit, fail_read, hold;
    int64_t fail_reap;  // the next look for completions fails with this errno
} mf_store;

struct ring {  // the head of the kernel's completion ring, mapped at the context's address
    unsigned id, nr, head, tail, magic, compat, incompat, header_length;
};

int64_t mf_store_open(mf_store *s) {
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, (long)s->depth, &ctx) < 0) return -errno;
    s->ctx = (uint64_t)ctx;
    return 0;
}

// one read is over: its key's bytes count, or the key is marked failed
static void complete(mf_store *s, int64_t j, int64_t res) {
    if (s->fail_read) res = -s->fail_read, s->fail_read = 0, s->hold = 0;
    int64_t key = s->cb_key[j], pos = s->cbs[j].aio_offset, hi = s->cb_hi[j];
    int64_t lo = pos > s->run_off[key] ? pos : s->run_off[key];
    if (res < 0) {
        if (!s->failed[key]) s->failed[key] = res;
    } else if (pos + res < hi) {  // the file's end cut a read that the run needs: truncated
        int64_t got = pos + res - s->run_off[key];
        if (!s->failed[key]) s->failed[key] = 1 + (got > 0 ? got : 0);
    } else {
        s->count[BYTES_READ] += hi - lo;
    }
    s->pending[key]--;
    s->cb_free[s->n_cb_free++] = j;
    s->in_flight--;
}

// takes at least `least` completions (0: those that are done, without a system call when the
// ring shows none); returns how many, or -errno
static int64_t reap(mf_store *s, int64_t least) {
    if (least > s->in_flight) least = s->in_flight;
    if (!s->in_flight) return 0;
    if (!s->ctx) return -EBADF;  // (closed after a failed reap: reads may still be in flight)
    if (s->fail_reap) {
        int64_t e = s->fail_reap;
        s->fail_reap = 0;
        return -e;
    }
    if (!least) {
        if (s->hold) return 0;
        const volatile struct ring *r = (const volatile struct ring *)(uintptr_t)s->ctx;
        if (r->magic == AIO_RING_MAGIC && r->head == r->tail) return 0;
    }
    long got;
    do got = syscall(SYS_io_getevents, (aio_context_t)s->ctx, (long)least, (long)s->depth, s->events, NULL);
    while (got < 0 && errno == EINTR);
    if (got < 0) return -errno;
    for (long i = 0; i < got; i++) complete(s, (int64_t)s->events[i].data, s->events[i].res);
    return got;
}

// submits the prepared reads, each with its own io_submit: the block layer holds a batch's reads
// until the call's last one is queued, and on this VM's virtio disk a batch's completions come
// late (paired runs at a 10% budget: 0.87x with one call for a layer's reads). The reads the
// kernel refuses fail their keys. Returns 0 or -errno
static int64_t flush(mf_store *s, int64_t *nb) {
    int64_t done = 0, e = s->fail_submit;
    s->fail_submit = 0;
    while (!e && done < *nb) {
        long got = syscall(SYS_io_submit, (aio_context_t)s->ctx, 1L, s->batch + done);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            e = errno;
            break;
        }
        done += got;
        s->in_flight += got;
    }
    for (int64_t i = done; i < *nb; i++) {  // never in flight
        int64_t j = s->batch[i] - s->cbs, key = s->cb_key[j];
        if (!s->failed[key]) s->failed[key] = -e;
        s->pending[key]--;
        s->cb_free[s->n_cb_free++] = j;
    }
    *nb = 0;
    return -e;
}

// the reads of keys[n] (their slots assigned), submitted in one batch (waves when the control
// blocks run out). Returns 0, or -11 with err_val = errno when the kernel refused some
static int submit(mf_store *s, const int64_t *keys, int64_t n) {
    int64_t nb = 0, rc = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t key = keys[i], off = s->run_off[key], end = off + s->run_len[key];
        int64_t start = off & ~(int64_t)(ALIGN - 1), stop = (end + ALIGN - 1) & ~(int64_t)(ALIGN - 1);
        uint64_t slot = s->base + (uint64_t)(s->slot_of[key] * s->stride);
        for (int64_t pos = start; pos < stop; pos += s->chunk) {
            if (!s->n_cb_free) {  // all blocks in flight: send what is ready, then free one
                if (nb && (rc = flush(s, &nb))) break;
                int64_t got = reap(s, 1);
                if (got < 0) {
                    rc = got;
                    break;
                }
            }
            int64_t len = stop - pos < s->chunk ? stop - pos : s->chunk;
            int64_t j = s->cb_free[--s->n_cb_free];
            struct iocb *cb = s->cbs + j;
            memset(cb, 0, sizeof *cb);
            cb->aio_data = (uint64_t)j;
            cb->aio_lio_opcode = IOCB_CMD_PREAD;
            cb->aio_fildes = (uint32_t)s->fd[key];
            cb->aio_buf = slot + (uint64_t)(pos - start);
            cb->aio_nbytes = (uint64_t)len;
            cb->aio_offset = pos;
            s->cb_key[j] = key;
            s->cb_hi[j] = pos + len < end ? pos + len : end;
            s->pending[key]++;
            s->batch[nb++] = cb;
        }
        if (rc) break;
    }
    if (!rc && nb) rc = flush(s, &nb);
    if (!rc) return 0;
    for (int64_t i = 0; i < nb; i++) {  // prepared, never sent
        int64_t j = s->batch[i] - s->cbs;
        s->pending[s->cb_key[j]]--;
        s->cb_free[s->n_cb_free++] = j;
    }
    for (int64_t i = 0; i < n; i++)  // keys with no read on the way must not look resident
        if (!s->failed[keys[i]]) s->failed[keys[i]] = rc;
    s->err_val = -rc;
    return -11;
}

// keys[n] leave the cache: their reads land first (they write into the slot), then the slots
// are free. Returns 0 or -12 with err_val = errno of a failed wait
static int release(mf_store *s, const int64_t *keys, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        int64_t key = keys[i];
        while (s->pending[key]) {
            int64_t got = reap(s, 1);
            if (got < 0) {
                s->err_val = -got;
                return -12;
            }
        }
        s->failed[key] = 0;
        if (s->slot_of[key] >= 0) s->free_slots[s->n_free++] = s->slot_of[key];
        s->slot_of[key] = -1;
    }
    return 0;
}

int mf_store_release(mf_store *s, const int64_t *keys, int64_t n) { return release(s, keys, n); }

// assigns slots to the cache's newly loaded keys and starts their reads, after the evicted
// ones have left
static int admit(mf_store *s, int64_t n_new, int64_t n_ev) {
    int rc = release(s, s->c_evicted, n_ev);
    if (rc) return rc;
    if (s->n_free < n_new) return -13;  // (the cache admitted more keys than there are slots: a bug)
    for (int64_t i = 0; i < n_new; i++) s->slot_of[s->c_loaded[i]] = s->free_slots[--s->n_free];
    return n_new ? submit(s, s->c_loaded, n_new) : 0;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// -10 with err_key / err_val when one of layer's ids[n] failed to arrive
static int check(mf_store *s, int64_t layer, const int64_t *ids, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0) continue;
        int64_t key = layer * s->E + ids[i];
        if (s->failed[key] && !s->pending[key]) {
            s->err_key = key, s->err_val = s->failed[key];
            return -10;
        }
    }
    return 0;
}

// waits until none of layer's ids[n] has a read in flight; 0, -10 (a read failed) or -12 (a
// failed wait: the store is no longer usable)
int mf_store_wait(mf_store *s, int64_t layer, const int64_t *ids, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0) continue;
        int64_t key = layer * s->E + ids[i];
        while (s->pending[key]) {
            int64_t got = reap(s, 1);
            if (got < 0) {
                s->err_val = -got;
                return -12;
            }
        }
    }
    return check(s, layer, ids, n);
}

// layer `layer` of step t runs on experts ids[n] (distinct, valid): makes them resident, their
// reads started. Writes each one's [gate | up] and down addresses to w13[n], w2[n] and, in sel[n],
// the positions whose bytes are in followed by those still arriving. Returns how many are still
// arriving (0 with `wait`, which waits for them); negative: the cache's errors (-1 to -4), -10 to
// -12 as above, -13 for more keys admitted than free slots (a bug).
int64_t mf_store_fetch(mf_store *s, int64_t layer, const int64_t *ids, int64_t n, int64_t t, int wait,
                       uint64_t *w13, uint64_t *w2, int64_t *sel) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0) {  // (the cache skips -1 as "unused"; every id fetched needs weights)
            s->c_res[0] = ids[i];
            return -1;
        }
    int rc = s->request(s->cache, layer, ids, n, t);
    if (rc) return rc;
    int64_t m = s->c_res[0], n_new = s->c_res[1], n_ev = s->c_res[2];
    s->count[ACCESSES] += m, s->count[HITS] += m - n_new, s->count[MISSES] += n_new;
    s->count[PREFETCH_HITS] += s->c_res[3], s->count[DEMAND_LOADS] += n_new;
    if (n_ev) s->count[EVICTIONS] += n_ev, s->count[WASTED] += s->c_res[4];
    int64_t t0 = n_new ? now_ns() : 0;
    rc = admit(s, n_new, n_ev);
    if (n_new) s->count[DEMAND_NS] += now_ns() - t0;
    if (rc) return rc;
    int64_t got = reap(s, 0);  // whatever landed meanwhile
    if (got < 0) {
        s->err_val = -got;
        return -12;
    }
    if (wait && (rc = mf_store_wait(s, layer, ids, n))) return rc;
    if ((rc = check(s, layer, ids, n))) return rc;
    int64_t ready = 0, late = 0;
    s->n_in_use = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t key = layer * s->E + ids[i];
        uint64_t at = s->base + (uint64_t)(s->slot_of[key] * s->stride) + (uint64_t)(s->run_off[key] % ALIGN);
        w13[i] = at + (uint64_t)s->gate_at, w2[i] = at + (uint64_t)s->down_at;
        if (s->pending[key]) sel[n - 1 - late++] = i;
        else sel[ready++] = i;
        s->in_use[s->n_in_use++] = key;
    }
    for (int64_t a = n - late, b = n - 1; a < b; a++, b--) {  // the late ones in position order
        int64_t tmp = sel[a];
        sel[a] = sel[b], sel[b] = tmp;
    }
    return late;
}

// starts reading experts ids[n] of `layer` ahead of their use, never evicting the last fetch's;
// 0 or the errors of mf_store_fetch
int mf_store_prefetch(mf_store *s, int64_t layer, const int64_t *ids, int64_t n) {
    int rc = s->prefetch(s->cache, layer, ids, n, s->in_use, s->n_in_use);
    if (rc) return rc;
    int64_t n_new = s->c_res[1], n_ev = s->c_res[2];
    s->count[PREFETCHES] += n_new;
    if (n_ev) s->count[EVICTIONS] += n_ev, s->count[WASTED] += s->c_res[4];
    return admit(s, n_new, n_ev);
}

// no read may still write into a slot once this returns; then the context is gone
void mf_store_close(mf_store *s) {
    while (s->in_flight)
        if (reap(s, s->in_flight) < 0) break;
    if (s->ctx) syscall(SYS_io_destroy, (aio_context_t)s->ctx);
    s->ctx = 0;
}
