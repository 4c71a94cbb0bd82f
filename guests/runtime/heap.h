/*
 * heap.h - a small general-purpose allocator over one contiguous region of
 * guest RAM (two-level segregated free lists with boundary tags: O(1)
 * allocation and free, neighbours coalesce on free).
 */
#ifndef TOYVM_HEAP_H
#define TOYVM_HEAP_H

#include "toyvm.h"

/* Manage [start, end).  Returns 0, or -1 if the region is too small. */
int    heap_init(void *start, void *end);
void  *heap_alloc(size_t n);                /* 16-byte aligned, NULL when out of memory */
void   heap_free(void *p);                  /* NULL is fine */
void  *heap_realloc(void *p, size_t n);     /* NULL on failure (p stays valid) */
size_t heap_usable(const void *p);          /* bytes usable at p (>= the size asked) */
size_t heap_size(void);                     /* bytes managed */
size_t heap_used(void);                     /* bytes in allocated blocks, overhead included */
size_t heap_block_cost(size_t n);           /* what heap_alloc(n) adds to heap_used() */
int    heap_check(void);                    /* walk the heap; 0 if consistent */

/*
 * The servers' heap runs from the end of the image to the top of RAM minus
 * this much stack: 1 MiB, or 128 KiB when RAM is under 8 MiB so that they
 * still start in the smallest machine (2 MiB).  Their stack use is a few KiB.
 */
static inline uint64_t heap_stack_reserve(uint64_t ram_size)
{
    return ram_size < (8UL << 20) ? (128UL << 10) : (1UL << 20);
}

#endif
