/*
 * toyvm.h - the toyvm machine contract (docs/machine.md, version 1) as C
 * constants, plus the guest runtime's declarations.
 *
 * Guests are freestanding: no libc.  Everything a guest needs to talk to the
 * machine is declared here and implemented in runtime.c and start.S.
 */
#ifndef TOYVM_H
#define TOYVM_H

typedef unsigned char      uint8_t;
typedef unsigned short     uint16_t;
typedef unsigned int       uint32_t;
typedef unsigned long      uint64_t;
typedef signed char        int8_t;
typedef short              int16_t;
typedef int                int32_t;
typedef long               int64_t;
typedef unsigned long      size_t;
typedef long               ssize_t;
typedef unsigned long      uintptr_t;

#define NULL ((void *)0)

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type)   __builtin_va_arg(ap, type)
#define va_end(ap)         __builtin_va_end(ap)
#define va_copy(d, s)      __builtin_va_copy(d, s)

/* ------------------------------------------------------------------ */
/* Memory map                                                          */
/* ------------------------------------------------------------------ */
#define TOYVM_CONTRACT_VERSION  1
#define TOYVM_PAGE_SIZE         4096UL
#define TOYVM_BOOT_INFO_ADDR    0x8000UL
#define TOYVM_CMDLINE_ADDR      0x8040UL
#define TOYVM_CMDLINE_MAX       4000U
#define TOYVM_LOAD_ADDR         0x100000UL

/* ------------------------------------------------------------------ */
/* Boot-info block, at 0x8000; RDI points to it at entry               */
/* ------------------------------------------------------------------ */
#define BOOT_INFO_MAGIC 0x42564D54U     /* the bytes "TMVB" */

struct boot_info {
    uint32_t magic;         /* BOOT_INFO_MAGIC */
    uint32_t version;       /* TOYVM_CONTRACT_VERSION */
    uint64_t ram_size;      /* bytes */
    uint64_t cmdline;       /* address of the NUL-terminated command line */
    uint32_t cmdline_len;   /* bytes, without the NUL, at most 4000 */
    uint32_t reserved;      /* 0 */
};
_Static_assert(sizeof(struct boot_info) == 32, "boot_info layout");

/* ------------------------------------------------------------------ */
/* Ports                                                               */
/* ------------------------------------------------------------------ */
/* COM1, 16550 subset, 1-byte accesses */
#define COM1_BASE       0x3F8
#define COM1_THR        0x3F8   /* write: transmit */
#define COM1_RBR        0x3F8   /* read: receive (0 if none) */
#define COM1_IER        0x3F9
#define COM1_IIR        0x3FA   /* read */
#define COM1_FCR        0x3FA   /* write, ignored */
#define COM1_LCR        0x3FB
#define COM1_MCR        0x3FC
#define COM1_LSR        0x3FD
#define COM1_MSR        0x3FE
#define COM1_SCR        0x3FF
#define LSR_DATA_READY  0x01    /* a received byte is waiting */
#define LSR_THR_EMPTY   0x20
#define LSR_TX_EMPTY    0x40

/* Power: a 4-byte write stops the VM; low 8 bits = host exit code */
#define POWER_PORT      0x500

/* Clock, 4-byte accesses; reading a low half latches the 64-bit value */
#define CLOCK_VIRT_LO   0x510   /* virtual ns, low half (latches) */
#define CLOCK_VIRT_HI   0x514
#define CLOCK_HOST_LO   0x518   /* host wall clock, ns since the epoch (latches) */
#define CLOCK_HOST_HI   0x51C
#define TIMER_DEADLINE_LO 0x520 /* write: deadline (virtual ns), low half */
#define TIMER_DEADLINE_HI 0x524 /* write: high half, arms; 0 in both disarms */
#define VCLOCK_NS_PER_PORT_ACCESS 1000

/* Random numbers, 4-byte read, host randomness (nondeterministic) */
#define RNG_PORT        0x530

/* Network device, 4-byte accesses */
#define NET_STATUS      0x540   /* read */
#define NET_RECV        0x544   /* write: descriptor address */
#define NET_SEND        0x548   /* write: descriptor address */
#define NET_RESULT      0x54C   /* read: result of the last RECV/SEND */

#define NET_STATUS_INPUT    0x1 /* an input event is waiting */
#define NET_STATUS_TX_ROOM  0x2 /* the output queue has room */

/* event kinds */
#define NET_EV_OPEN     1
#define NET_EV_DATA     2
#define NET_EV_CLOSE    3

/* RESULT codes */
#define NET_OK          0
#define NET_NO_INPUT    1
#define NET_QUEUE_FULL  2
#define NET_BAD_DESC    3

#define NET_MAX_SEND    (64U * 1024U)   /* largest DATA send */

struct net_desc {
    uint32_t kind;      /* NET_EV_* */
    uint32_t conn;      /* connection id, chosen by the host */
    uint64_t buf;       /* guest address of the data buffer */
    uint32_t cap;       /* receive: buffer capacity; send: bytes to send */
    uint32_t len;       /* receive: bytes the device wrote into buf */
    uint64_t seq;       /* sequence number, filled by the device */
};
_Static_assert(sizeof(struct net_desc) == 32, "net_desc layout");

/* ------------------------------------------------------------------ */
/* Port I/O                                                            */
/* ------------------------------------------------------------------ */
/* "memory" clobbers: device accesses are ordering points, and RECV/SEND
 * make the device read and write guest memory behind the compiler's back. */
static inline void outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}
static inline void outw(uint16_t port, uint16_t v)
{
    __asm__ volatile("outw %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}
static inline void outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port) : "memory");
}
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %w1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %w1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %w1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
/* Idle until an input arrives or the armed timer expires. */
static inline void hlt(void)
{
    __asm__ volatile("hlt" : : : "memory");
}

/* ------------------------------------------------------------------ */
/* Runtime (runtime.c)                                                 */
/* ------------------------------------------------------------------ */
/* provided by the linker script */
extern char __bss_start[], _end[];

int  main(const struct boot_info *bi);

/* serial output */
void putc(char c);
void puts(const char *s);               /* writes s, then a newline */
void write_serial(const void *buf, size_t len);
int  printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int  vprintf(const char *fmt, va_list ap);
int  snprintf(char *buf, size_t cap, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
int  vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap);

/* memory and strings (gcc emits calls to the first four on its own) */
void  *memcpy(void *dst, const void *src, size_t n);
void  *memmove(void *dst, const void *src, size_t n);
void  *memset(void *dst, int c, size_t n);
int    memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* clocks and timer */
uint64_t vclock_ns(void);               /* virtual time (deterministic) */
uint64_t hostclock_ns(void);            /* host wall clock (not deterministic) */
void     timer_arm(uint64_t deadline_ns);
void     timer_disarm(void);
void     sleep_ns(uint64_t ns);         /* sleep in virtual time, via the timer */

/* random numbers from the host (not deterministic) */
uint32_t rand32(void);

/* command line: "key=value key2=value2 ..." */
const char *cmdline(const struct boot_info *bi);
/* The value of key, or NULL if absent; *len gets its length. */
const char *arg_find(const struct boot_info *bi, const char *key, size_t *len);
/* Integer value of key (decimal, or hex with 0x); def if absent or not a number. */
long arg_long(const struct boot_info *bi, const char *key, long def);
/* 1 if key's value equals want. */
int  arg_is(const struct boot_info *bi, const char *key, const char *want);

/* network */
uint32_t net_status(void);
int  net_recv(struct net_desc *d);      /* returns RESULT */
int  net_send(struct net_desc *d);      /* returns RESULT */
/* Send len bytes on conn in chunks of at most 64 KiB, idling (hlt) while the
 * output queue is full.  Returns 0, or the failing RESULT code. */
int  net_send_all(uint32_t conn, const void *buf, size_t len);
int  net_close(uint32_t conn);          /* send CLOSE(conn); returns RESULT */

/* power */
void power_off(int code) __attribute__((noreturn));

/* small helpers */
static inline uint64_t align_up(uint64_t x, uint64_t a)
{
    return (x + a - 1) & ~(a - 1);
}

#endif /* TOYVM_H */
