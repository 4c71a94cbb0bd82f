/*
 * noisy - a Redis-protocol server whose answers differ between replicas on
 * purpose (host clock and host randomness): the workload for hybrid (COLO)
 * mode, where the gateway compares the replicas' outputs.
 *   PING [msg]   +PONG (or msg); ECHO msg: msg
 *   TIME         :<host clock, ns since the epoch>
 *   RANDOM [n]   n random bytes (default 16), hex-encoded, as a bulk string
 *   SET k v      +OK (stores nothing)
 *   GET k        "<host clock ns>:<8 random hex digits>"
 *   DBSIZE       :0
 */
#include "runtime/toyvm.h"
#include "runtime/heap.h"
#include "runtime/resp.h"

#define MIN_HEAP       (256UL << 10)
#define RANDOM_MAX     (256U * 1024U)   /* bytes; the reply is twice that */

static const char hexdigits[] = "0123456789abcdef";

static void reply_random(int64_t n)
{
    reply_bulk_header((size_t)n * 2);
    char chunk[256];
    size_t used = 0;
    while (n > 0) {
        uint32_t r = rand32();
        for (int b = 0; b < 4 && n > 0; b++, n--) {
            chunk[used++] = hexdigits[(r >> 4) & 15];
            chunk[used++] = hexdigits[r & 15];
            r >>= 8;
        }
        if (used > sizeof chunk - 8) {
            reply_raw(chunk, used);
            used = 0;
        }
    }
    reply_raw(chunk, used);
    reply_crlf();
}

static void handle(int argc, const struct resp_arg *argv)
{
    const struct resp_arg *cmd = &argv[0];

    if (resp_arg_is(cmd, "ping")) {
        if (argc == 1)
            reply_simple("PONG");
        else if (argc == 2)
            reply_bulk(argv[1].p, argv[1].len);
        else
            goto arity;
    } else if (resp_arg_is(cmd, "echo")) {  /* redis-cli --pipe ends its stream with an ECHO */
        if (argc != 2)
            goto arity;
        reply_bulk(argv[1].p, argv[1].len);
    } else if (resp_arg_is(cmd, "time")) {
        if (argc != 1)
            goto arity;
        reply_int((int64_t)hostclock_ns());
    } else if (resp_arg_is(cmd, "random")) {
        int64_t n = 16;
        if (argc > 2)
            goto arity;
        if (argc == 2 && (resp_arg_int(&argv[1], &n) || n < 0 || n > RANDOM_MAX)) {
            reply_error("ERR value is not an integer or out of range");
            return;
        }
        reply_random(n);
    } else if (resp_arg_is(cmd, "set")) {
        if (argc != 3)
            goto arity;
        reply_simple("OK");
    } else if (resp_arg_is(cmd, "get")) {
        if (argc != 2)
            goto arity;
        char tmp[48];
        uint64_t now = hostclock_ns();
        int n = snprintf(tmp, sizeof tmp, "%lu:%08x", now, rand32());
        reply_bulk(tmp, (size_t)n);
    } else if (resp_arg_is(cmd, "dbsize")) {
        if (argc != 1)
            goto arity;
        reply_int(0);
    } else {
        reply_unknown_command(cmd);
    }
    return;
arity:
    reply_wrong_arity(cmd);
}

int main(const struct boot_info *bi)
{
    uint64_t ram = bi->ram_size;
    uint64_t lo = align_up((uint64_t)(uintptr_t)_end, 16);
    uint64_t stack = heap_stack_reserve(ram);
    uint64_t hi = ram > stack ? ram - stack : 0;
    if (hi < lo + MIN_HEAP || heap_init((void *)lo, (void *)hi)) {
        printf("noisy: not enough RAM (%lu KiB): need at least %lu KiB\n",
               ram >> 10, (lo + MIN_HEAP + stack + 1023) >> 10);
        return 2;
    }
    puts("noisy: ready");
    resp_serve(handle);
}
