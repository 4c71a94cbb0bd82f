/*
 * kvstore - an in-memory key-value server speaking the Redis protocol
 * (RESP2) over the toyvm network device: PING, ECHO, SET, GET, DEL, INCR, EXISTS,
 * DBSIZE.  redis-cli and redis-benchmark work against it unmodified.
 *
 * Keys and values live in a chained hash table allocated from the heap
 * (everything between the image and RAM top minus 1 MiB of stack; 128 KiB
 * when RAM is under 8 MiB).  Data may use the heap up to a "maxmemory"
 * limit that keeps a reserve for connection buffers; past it, writes answer
 * -OOM instead of failing.
 */
#include "runtime/toyvm.h"
#include "runtime/heap.h"
#include "runtime/resp.h"

#define MIN_HEAP       (256UL << 10)

struct entry {
    struct entry *next;     /* bucket chain */
    uint64_t      hash;
    uint8_t      *val;      /* heap block, or NULL when vlen == 0 */
    uint32_t      klen;
    uint32_t      vlen;
    uint8_t       key[];
};

static struct entry **buckets;
static uint64_t       nbuckets;     /* a power of two */
static uint64_t       nkeys;
static size_t         maxmemory;    /* heap_used() limit for data */

/* ------------------------------------------------------------------ */
/* Hashing and the table                                               */
/* ------------------------------------------------------------------ */

typedef uint64_t __attribute__((may_alias, aligned(1))) u64_unaligned;

static uint64_t mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDUL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53UL;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_key(const uint8_t *p, size_t n)
{
    uint64_t h = 0x243F6A8885A308D3UL ^ (n * 0x9E3779B97F4A7C15UL);
    while (n >= 8) {
        h = (h ^ *(const u64_unaligned *)p) * 0x100000001B3UL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    uint64_t tail = 0;
    for (size_t i = 0; i < n; i++)
        tail |= (uint64_t)p[i] << (8 * i);
    return mix(h ^ tail);
}

/* Allocate data memory, honouring maxmemory. */
static void *data_alloc(size_t n)
{
    if (heap_used() + heap_block_cost(n) > maxmemory)
        return NULL;
    return heap_alloc(n);
}

static struct entry **find_slot(const struct resp_arg *key, uint64_t h)
{
    struct entry **pp = &buckets[h & (nbuckets - 1)];
    for (; *pp; pp = &(*pp)->next) {
        struct entry *e = *pp;
        if (e->hash == h && e->klen == key->len && memcmp(e->key, key->p, key->len) == 0)
            break;
    }
    return pp;
}

static struct entry *lookup(const struct resp_arg *key)
{
    return *find_slot(key, hash_key(key->p, key->len));
}

/* Double the bucket array when the load passes 1; failure is harmless. */
static void maybe_grow(void)
{
    if (nkeys <= nbuckets)
        return;
    uint64_t n = nbuckets * 2;
    struct entry **fresh = heap_alloc(n * sizeof *fresh);
    if (!fresh)
        return;
    memset(fresh, 0, n * sizeof *fresh);
    for (uint64_t i = 0; i < nbuckets; i++) {
        struct entry *e = buckets[i];
        while (e) {
            struct entry *next = e->next;
            struct entry **head = &fresh[e->hash & (n - 1)];
            e->next = *head;
            *head = e;
            e = next;
        }
    }
    heap_free(buckets);
    buckets = fresh;
    nbuckets = n;
}

/* Store value under key.  Returns 0, or -1 when memory is exhausted (the
 * old value, if any, is then untouched). */
static int store(const struct resp_arg *key, const void *val, size_t vlen)
{
    uint8_t *v = NULL;
    if (vlen) {
        v = data_alloc(vlen);
        if (!v)
            return -1;
        memcpy(v, val, vlen);
    }
    uint64_t h = hash_key(key->p, key->len);
    struct entry **pp = find_slot(key, h);
    struct entry *e = *pp;
    int created = 0;
    if (e) {
        heap_free(e->val);
    } else {
        e = data_alloc(sizeof *e + key->len);
        if (!e) {
            heap_free(v);
            return -1;
        }
        e->next = NULL;
        e->hash = h;
        e->klen = (uint32_t)key->len;
        memcpy(e->key, key->p, key->len);
        *pp = e;
        nkeys++;
        created = 1;
    }
    e->val = v;
    e->vlen = (uint32_t)vlen;
    if (created)
        maybe_grow();
    return 0;
}

static int delete(const struct resp_arg *key)
{
    struct entry **pp = find_slot(key, hash_key(key->p, key->len));
    struct entry *e = *pp;
    if (!e)
        return 0;
    *pp = e->next;
    heap_free(e->val);
    heap_free(e);
    nkeys--;
    return 1;
}

/* ------------------------------------------------------------------ */
/* Commands                                                            */
/* ------------------------------------------------------------------ */

static void cmd_incr(const struct resp_arg *key)
{
    struct entry *e = lookup(key);
    int64_t v = 0;
    if (e) {
        struct resp_arg cur = { e->val, e->vlen };
        if (resp_arg_int(&cur, &v)) {
            reply_error("ERR value is not an integer or out of range");
            return;
        }
        if (v == 0x7FFFFFFFFFFFFFFFL) {
            reply_error("ERR increment or decrement would overflow");
            return;
        }
    }
    v++;
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "%ld", v);
    if (store(key, tmp, (size_t)n)) {
        reply_oom();
        return;
    }
    reply_int(v);
}

static void handle(int argc, const struct resp_arg *argv)
{
    const struct resp_arg *cmd = &argv[0];

    if (resp_arg_is(cmd, "get")) {
        if (argc != 2)
            goto arity;
        struct entry *e = lookup(&argv[1]);
        if (e)
            reply_bulk(e->val, e->vlen);
        else
            reply_null();
    } else if (resp_arg_is(cmd, "set")) {
        if (argc != 3)
            goto arity;
        if (store(&argv[1], argv[2].p, argv[2].len))
            reply_oom();
        else
            reply_simple("OK");
    } else if (resp_arg_is(cmd, "ping")) {
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
    } else if (resp_arg_is(cmd, "incr")) {
        if (argc != 2)
            goto arity;
        cmd_incr(&argv[1]);
    } else if (resp_arg_is(cmd, "del")) {
        if (argc < 2)
            goto arity;
        int64_t n = 0;
        for (int i = 1; i < argc; i++)
            n += delete(&argv[i]);
        reply_int(n);
    } else if (resp_arg_is(cmd, "exists")) {
        if (argc < 2)
            goto arity;
        int64_t n = 0;
        for (int i = 1; i < argc; i++)
            n += lookup(&argv[i]) != NULL;
        reply_int(n);
    } else if (resp_arg_is(cmd, "dbsize")) {
        if (argc != 1)
            goto arity;
        reply_int((int64_t)nkeys);
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
        printf("kvstore: not enough RAM (%lu KiB): need at least %lu KiB\n",
               ram >> 10, (lo + MIN_HEAP + stack + 1023) >> 10);
        return 2;
    }
    /* Keep 1/8 of the heap (at least 128 KiB, at most 16 MiB) for
     * connection buffers, so a full store still parses and answers. */
    size_t reserve = heap_size() / 8;
    if (reserve < (128UL << 10))
        reserve = 128UL << 10;
    if (reserve > (16UL << 20))
        reserve = 16UL << 20;
    maxmemory = heap_size() - reserve;

    nbuckets = 1024;
    buckets = heap_alloc(nbuckets * sizeof *buckets);
    memset(buckets, 0, nbuckets * sizeof *buckets);

    printf("kvstore: ready (ram %lu MiB)\n", ram >> 20);
    resp_serve(handle);
}
