/* Optional native hooks for toyvm, loaded with ctypes (not a Python extension).
 * The pure-Python hooks in toyvm/machine.py do the same work and stay the reference; these exist because a
 * Python TLB-fill hook costs ~1.75 us per fill and exact time slicing in Python needs a per-block hook. */
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

typedef struct { uint64_t paddr; int perms; } uc_tlb_entry;   /* unicorn 2.1's struct uc_tlb_entry */
typedef int (*stop_fn)(void *uc);

enum { MEM_WRITE = 17, PROT_RX = 1 | 4, PROT_RWX = 1 | 2 | 4 };

typedef struct {
    uint8_t *dirty;            /* one byte per guest page, shared with GuestRAM.dirty_bitmap */
    uint64_t npages;
    stop_fn stop;              /* uc_emu_stop */
    volatile int32_t stop_request;  /* set by any thread: stop at the next block boundary */
    int32_t stopped;           /* set here when this hook stopped the emulation */
    uint64_t deadline_ns;      /* CLOCK_MONOTONIC deadline of the slice, 0 = none */
    uint64_t blocks;
} toyvm_native;

/* A read or fetch fill grants R|X only, so the first store to the page fills again as a WRITE and is logged. */
bool toyvm_tlb_fill(void *uc, uint64_t vaddr, int type, uc_tlb_entry *e, toyvm_native *s) {
    (void)uc;
    e->paddr = vaddr;
    if (type == MEM_WRITE) {
        uint64_t page = vaddr >> 12;
        if (page < s->npages) s->dirty[page] = 1;
        e->perms = PROT_RWX;
    } else {
        e->perms = PROT_RX;
    }
    return true;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Stopping from a block hook is exact: nothing of the next block has run. The clock is read every 64 blocks. */
void toyvm_block(void *uc, uint64_t addr, uint32_t size, toyvm_native *s) {
    (void)addr; (void)size;
    if (s->stop_request || ((++s->blocks & 63) == 0 && s->deadline_ns && now_ns() >= s->deadline_ns)) {
        s->stop_request = 0;
        s->stopped = 1;
        s->stop(uc);
    }
}
