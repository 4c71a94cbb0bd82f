/*
 * heap.c - two-level segregated-fit allocator.
 *
 * Every block starts with an 8-byte header: its size (a multiple of 16,
 * header included) and two flags.  A free block also keeps list links after
 * the header and a copy of its size in its last 8 bytes (the footer), so the
 * block after it can find it when it is freed.  Blocks start at addresses
 * that are 8 mod 16, which makes every payload 16-byte aligned.  A zero-size
 * "in use" header closes the heap so the last block never looks past it.
 *
 * Free blocks are kept in lists by size class: a first level by power of
 * two, a second level splitting each power of two into 16 ranges.  Two
 * bitmaps say which lists are non-empty.  To allocate, the request is rounded
 * up to the start of the next class, so any block in the chosen list fits.
 */
#include "heap.h"

#define F_FREE       1UL        /* this block is free */
#define F_PREV_FREE  2UL        /* the block just before this one is free */
#define F_MASK       15UL

#define HDR          8UL
#define MIN_BLOCK    32UL       /* header + two links + footer */

#define SL_BITS      4
#define SL_COUNT     (1 << SL_BITS)
#define SMALL_LIMIT  256UL      /* below: one list per 16 bytes (first level 0) */
#define FL_COUNT     36         /* sizes up to 2^42 */

struct block {
    uint64_t      hdr;
    struct block *next;         /* only while free */
    struct block *prev;
};

static struct block *lists[FL_COUNT][SL_COUNT];
static uint64_t fl_bitmap;          /* bit fl: some list in lists[fl] is non-empty */
static uint32_t sl_bitmap[FL_COUNT]; /* bit sl: lists[fl][sl] is non-empty */
static uint8_t *heap_lo, *heap_hi;      /* first block, sentinel */
static size_t   total, used;

static inline size_t bsize(const struct block *b)  { return b->hdr & ~F_MASK; }
static inline struct block *after(struct block *b) { return (struct block *)((uint8_t *)b + bsize(b)); }
static inline void set_footer(struct block *b)
{
    *(uint64_t *)((uint8_t *)b + bsize(b) - 8) = bsize(b);
}

static inline int fls64(uint64_t x) { return 63 - __builtin_clzl(x); }

static void mapping(size_t size, int *fl, int *sl)
{
    if (size < SMALL_LIMIT) {
        *fl = 0;
        *sl = (int)(size >> 4);
    } else {
        int f = fls64(size);
        *sl = (int)(size >> (f - SL_BITS)) & (SL_COUNT - 1);
        *fl = f - 7;    /* 256 = 2^8 maps to first level 1 */
    }
}

static void list_insert(struct block *b)
{
    int fl, sl;
    mapping(bsize(b), &fl, &sl);
    b->prev = NULL;
    b->next = lists[fl][sl];
    if (b->next)
        b->next->prev = b;
    lists[fl][sl] = b;
    fl_bitmap |= 1UL << fl;
    sl_bitmap[fl] |= 1U << sl;
}

static void list_remove(struct block *b)
{
    int fl, sl;
    mapping(bsize(b), &fl, &sl);
    if (b->prev)
        b->prev->next = b->next;
    else
        lists[fl][sl] = b->next;
    if (b->next)
        b->next->prev = b->prev;
    if (!lists[fl][sl]) {
        sl_bitmap[fl] &= ~(1U << sl);
        if (!sl_bitmap[fl])
            fl_bitmap &= ~(1UL << fl);
    }
}

/* A free block of at least size bytes, removed from its list, or NULL. */
static struct block *take_fit(size_t size)
{
    size_t rounded = size;
    if (size >= SMALL_LIMIT)
        rounded += (1UL << (fls64(size) - SL_BITS)) - 1;   /* up to the next class */
    int fl, sl;
    mapping(rounded, &fl, &sl);
    struct block *b = NULL;
    uint32_t sl_map = fl < FL_COUNT ? sl_bitmap[fl] & (~0U << sl) : 0;
    if (!sl_map && fl + 1 < FL_COUNT) {
        uint64_t fl_map = fl_bitmap & (~0UL << (fl + 1));
        if (fl_map) {
            fl = __builtin_ctzl(fl_map);
            sl_map = sl_bitmap[fl];
        }
    }
    if (sl_map) {
        b = lists[fl][__builtin_ctz(sl_map)];   /* any block here fits */
    } else {
        /* Nothing in the larger classes: a block in the request's own class
         * may still be big enough (this matters when memory is nearly full). */
        mapping(size, &fl, &sl);
        for (b = fl < FL_COUNT ? lists[fl][sl] : NULL; b && bsize(b) < size; b = b->next)
            ;
    }
    if (b)
        list_remove(b);
    return b;
}

static size_t block_size_for(size_t n)
{
    if (n > ((size_t)1 << 40))
        return 0;
    size_t s = (n + HDR + 15) & ~15UL;
    return s < MIN_BLOCK ? MIN_BLOCK : s;
}

size_t heap_block_cost(size_t n)
{
    return block_size_for(n);
}

int heap_init(void *start, void *end)
{
    uint8_t *lo = (uint8_t *)((((uintptr_t)start + HDR + 15) & ~15UL) - HDR);
    uint8_t *hi = (uint8_t *)end;
    if (hi <= lo || (size_t)(hi - lo) < MIN_BLOCK + 2 * HDR + 16)
        return -1;
    size_t size = ((size_t)(hi - lo) - HDR) & ~15UL;    /* leave room for the sentinel */
    if (size > ((size_t)1 << 41))
        size = (size_t)1 << 41;
    memset(lists, 0, sizeof lists);
    memset(sl_bitmap, 0, sizeof sl_bitmap);
    fl_bitmap = 0;
    heap_lo = lo;
    heap_hi = lo + size;
    total = size;
    used = 0;
    struct block *b = (struct block *)lo;
    b->hdr = size | F_FREE;
    set_footer(b);
    ((struct block *)heap_hi)->hdr = 0 | F_PREV_FREE;   /* sentinel: size 0, in use */
    list_insert(b);
    return 0;
}

/* Mark b (free, off the lists) as used with size need; a large enough
 * remainder becomes a free block of its own. */
static void carve(struct block *b, size_t need)
{
    size_t size = bsize(b);
    if (size - need >= MIN_BLOCK) {
        struct block *rest = (struct block *)((uint8_t *)b + need);
        rest->hdr = (size - need) | F_FREE;       /* its predecessor (b) is in use */
        set_footer(rest);
        list_insert(rest);                        /* the block after rest keeps F_PREV_FREE */
        b->hdr = need | (b->hdr & F_PREV_FREE);
    } else {
        b->hdr &= ~F_FREE;
        after(b)->hdr &= ~F_PREV_FREE;
    }
    used += bsize(b);
}

void *heap_alloc(size_t n)
{
    size_t need = block_size_for(n);
    if (!need || need > total)
        return NULL;
    struct block *b = take_fit(need);
    if (!b)
        return NULL;
    carve(b, need);
    return (uint8_t *)b + HDR;
}

void heap_free(void *p)
{
    if (!p)
        return;
    struct block *b = (struct block *)((uint8_t *)p - HDR);
    size_t size = bsize(b);
    used -= size;
    uint64_t keep = b->hdr & F_PREV_FREE;
    if (keep) {
        size_t psize = *(uint64_t *)((uint8_t *)b - 8);
        struct block *prev = (struct block *)((uint8_t *)b - psize);
        list_remove(prev);
        size += psize;
        b = prev;
        keep = b->hdr & F_PREV_FREE;    /* always clear: free neighbours merge */
    }
    struct block *next = (struct block *)((uint8_t *)b + size);
    if (next->hdr & F_FREE) {
        list_remove(next);
        size += bsize(next);
    }
    b->hdr = size | F_FREE | keep;
    set_footer(b);
    after(b)->hdr |= F_PREV_FREE;
    list_insert(b);
}

size_t heap_usable(const void *p)
{
    const struct block *b = (const struct block *)((const uint8_t *)p - HDR);
    return bsize(b) - HDR;
}

void *heap_realloc(void *p, size_t n)
{
    if (!p)
        return heap_alloc(n);
    size_t need = block_size_for(n);
    if (!need)
        return NULL;
    struct block *b = (struct block *)((uint8_t *)p - HDR);
    size_t size = bsize(b);
    if (need <= size)
        return p;                       /* never shrinks in place; fine for our uses */
    struct block *next = after(b);
    if ((next->hdr & F_FREE) && size + bsize(next) >= need) {
        /* grow into the free neighbour */
        list_remove(next);
        used -= size;
        b->hdr = (size + bsize(next)) | (b->hdr & F_PREV_FREE) | F_FREE;
        carve(b, need);
        return p;
    }
    void *q = heap_alloc(n);
    if (!q)
        return NULL;
    memcpy(q, p, size - HDR);
    heap_free(p);
    return q;
}

size_t heap_size(void) { return total; }
size_t heap_used(void) { return used; }

int heap_check(void)
{
    size_t in_use = 0, free_bytes = 0;
    int prev_free = 0;
    struct block *b = (struct block *)heap_lo;
    while ((uint8_t *)b < heap_hi) {
        size_t s = bsize(b);
        if (s < MIN_BLOCK || (s & 15) || (uint8_t *)b + s > heap_hi)
            return -1;
        if (!!(b->hdr & F_PREV_FREE) != prev_free)
            return -2;
        if (b->hdr & F_FREE) {
            if (prev_free)
                return -3;      /* two free neighbours */
            if (*(uint64_t *)((uint8_t *)b + s - 8) != s)
                return -4;
            free_bytes += s;
        } else {
            in_use += s;
        }
        prev_free = !!(b->hdr & F_FREE);
        b = after(b);
    }
    if ((uint8_t *)b != heap_hi || !!(b->hdr & F_PREV_FREE) != prev_free)
        return -5;
    if (in_use != used || in_use + free_bytes != total)
        return -6;
    size_t listed = 0;
    for (int fl = 0; fl < FL_COUNT; fl++)
        for (int sl = 0; sl < SL_COUNT; sl++)
            for (struct block *f = lists[fl][sl]; f; f = f->next) {
                if (!(f->hdr & F_FREE))
                    return -7;
                int a, c;
                mapping(bsize(f), &a, &c);
                if (a != fl || c != sl)
                    return -8;
                listed += bsize(f);
            }
    if (listed != free_bytes)
        return -9;
    return 0;
}
