// Linux AIO submission and reaping for store/aio.py's AioQueue, one call per batch: filling each
// control block field by field through ctypes and reaping events one by one cost tens of µs of
// Python per read, on the model's own thread, between its kernels.

#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

// reads[i] = (tag, control block index, fd, buffer address, nbytes, file offset): each is
// prepared in cbs[index] and submitted with its own io_submit (a batched call keeps the block
// queue plugged until the last read is prepared). Returns how many went in; *err = the errno
// that stopped the rest (0 when all went).
int64_t mf_aio_submit(uint64_t ctx, struct iocb *cbs, const int64_t *reads, int64_t n, int64_t *err) {
    int64_t done = 0;
    *err = 0;
    while (done < n) {
        const int64_t *r = reads + 6 * done;
        struct iocb *cb = cbs + r[1];
        memset(cb, 0, sizeof *cb);
        cb->aio_data = (uint64_t)r[0];
        cb->aio_lio_opcode = IOCB_CMD_PREAD;
        cb->aio_fildes = (uint32_t)r[2];
        cb->aio_buf = (uint64_t)r[3];
        cb->aio_nbytes = (uint64_t)r[4];
        cb->aio_offset = r[5];
        struct iocb *one[1] = {cb};
        long got = syscall(SYS_io_submit, (aio_context_t)ctx, 1L, one);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            *err = errno;
            break;
        }
        done += got;
    }
    return done;
}

// waits for at least `least` completions (0: only those done); writes (tag, result) pairs to
// out [max, 2]; returns how many, or -errno
int64_t mf_aio_reap(uint64_t ctx, int64_t least, int64_t max, struct io_event *events, int64_t *out) {
    long got;
    do got = syscall(SYS_io_getevents, (aio_context_t)ctx, (long)least, (long)max, events, NULL);
    while (got < 0 && errno == EINTR);
    if (got < 0) return -errno;
    for (long i = 0; i < got; i++) out[2 * i] = (int64_t)events[i].data, out[2 * i + 1] = events[i].res;
    return got;
}
