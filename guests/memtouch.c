/*
 * memtouch - the checkpoint-cost workload: dirties N pages per iteration.
 *   pages=N        pages in the buffer (default 16)
 *   iters=K        iterations, 0 = run forever (default 0)
 *   fill=word      write one 8-byte word per page per iteration (default)
 *   fill=random    rewrite each whole page with incompressible bytes
 *   report=R       print a progress line every R iterations (default 0 = never)
 *   seed=S         seed of the fill=random generator (default 1)
 *   serve=1        also echo every network message back to its sender,
 *                  between iterations (a client can time the guest)
 * The buffer starts at the first 2 MiB boundary above the image.  Without
 * serve=1 the iteration loop does no port I/O, and the random bytes come
 * from a deterministic xorshift64 generator, so the run is deterministic.
 */
#include "runtime/toyvm.h"

#define STACK_RESERVE  (64UL << 10)
#define BUF_ALIGN      (2UL << 20)
#define WORDS_PER_PAGE (TOYVM_PAGE_SIZE / 8)

static void touch_words(volatile uint64_t *buf, uint64_t pages, uint64_t iter)
{
    volatile uint64_t *p = buf + (iter % WORDS_PER_PAGE);  /* byte offset (iter*8) % 4096 */
    for (uint64_t i = 0; i < pages; i++, p += WORDS_PER_PAGE)
        *p = iter;
}

static uint64_t touch_random(volatile uint64_t *buf, uint64_t pages, uint64_t x)
{
    volatile uint64_t *end = buf + pages * WORDS_PER_PAGE;
    for (volatile uint64_t *p = buf; p < end; p++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *p = x;
    }
    return x;
}

/* serve=1: take the waiting network events and echo what they carry. */
static char echo_buf[4096];

static void serve_echo(void)
{
    while (net_status() & NET_STATUS_INPUT) {
        struct net_desc d = {0};
        d.buf = (uint64_t)(uintptr_t)echo_buf;
        d.cap = sizeof echo_buf;
        if (net_recv(&d) != NET_OK)
            return;
        if (d.kind == NET_EV_DATA && d.len)
            net_send_all(d.conn, echo_buf, d.len);
        else if (d.kind == NET_EV_CLOSE)
            net_close(d.conn);
    }
}

/* FNV-1a over the buffer's 64-bit words. */
static uint64_t checksum(const uint64_t *buf, uint64_t words)
{
    uint64_t h = 0xCBF29CE484222325UL;
    for (uint64_t i = 0; i < words; i++) {
        h ^= buf[i];
        h *= 0x100000001B3UL;
    }
    return h;
}

int main(const struct boot_info *bi)
{
    long pages = arg_long(bi, "pages", 16);
    long iters = arg_long(bi, "iters", 0);
    long report = arg_long(bi, "report", 0);
    long serve = arg_long(bi, "serve", 0);
    uint64_t seed = (uint64_t)arg_long(bi, "seed", 1);
    int random = 0;
    size_t flen;
    const char *fill = arg_find(bi, "fill", &flen);
    if (fill && !arg_is(bi, "fill", "word")) {
        if (!arg_is(bi, "fill", "random")) {
            printf("memtouch: error: fill=%.*s: expected fill=word or fill=random\n", (int)flen, fill);
            return 2;
        }
        random = 1;
    }
    if (pages < 1 || iters < 0 || report < 0) {
        printf("memtouch: error: pages must be >= 1, iters and report >= 0\n");
        return 2;
    }
    if (seed == 0)
        seed = 1;       /* xorshift must not start at zero */

    uint64_t ram = bi->ram_size;
    uint64_t base = align_up((uint64_t)(uintptr_t)_end, BUF_ALIGN);
    uint64_t limit = ram > STACK_RESERVE ? ram - STACK_RESERVE : 0;
    uint64_t room = limit > base ? (limit - base) / TOYVM_PAGE_SIZE : 0;
    if ((uint64_t)pages > room) {
        printf("memtouch: error: pages=%ld does not fit: the buffer starts at 0x%lx and must end "
               "below 0x%lx (RAM %lu MiB minus 64 KiB of stack), room for %lu pages\n",
               pages, base, limit, ram >> 20, room);
        return 2;
    }

    volatile uint64_t *buf = (volatile uint64_t *)base;
    printf("memtouch: %ld pages at 0x%lx, fill=%s, iters=%ld\n",
           pages, base, random ? "random" : "word", iters);
    uint64_t x = seed;
    for (uint64_t it = 1; iters == 0 || it <= (uint64_t)iters; it++) {
        if (random)
            x = touch_random(buf, (uint64_t)pages, x);
        else
            touch_words(buf, (uint64_t)pages, it);
        if (serve)
            serve_echo();
        if (report && it % (uint64_t)report == 0)
            printf("memtouch: iteration %lu at %lu ms\n", it, vclock_ns() / 1000000UL);
    }
    printf("memtouch done: %ld iterations, %ld pages, checksum %016lx\n", iters, pages,
           checksum((const uint64_t *)base, (uint64_t)pages * WORDS_PER_PAGE));
    return 0;
}
