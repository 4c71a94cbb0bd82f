/*
 * runtime.c - the guest runtime: serial output, printf, memory and string
 * functions, clocks and timer, random numbers, command-line parsing, the
 * network device and the power port.  Written against docs/machine.md.
 */
#include "toyvm.h"

/* ------------------------------------------------------------------ */
/* Serial                                                              */
/* ------------------------------------------------------------------ */

void putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THR_EMPTY))
        ;
    outb(COM1_THR, (uint8_t)c);
}

void write_serial(const void *buf, size_t len)
{
    const char *p = buf;
    for (size_t i = 0; i < len; i++)
        putc(p[i]);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
    putc('\n');
}

/* ------------------------------------------------------------------ */
/* Formatting                                                          */
/* ------------------------------------------------------------------ */
/*
 * A small printf: conversions d i u x X s c p %, length modifiers l ll z,
 * flags '-' and '0', a field width and (for %s) a precision.
 * Output goes through a sink, so printf and snprintf share the code.
 */
struct sink {
    char  *buf;     /* NULL: write to the serial port */
    size_t cap;
    size_t n;       /* characters produced so far (snprintf's return value) */
};

static void sink_put(struct sink *s, char c)
{
    if (!s->buf)
        putc(c);
    else if (s->n + 1 < s->cap)
        s->buf[s->n] = c;
    s->n++;
}

static void sink_pad(struct sink *s, char c, int count)
{
    while (count-- > 0)
        sink_put(s, c);
}

static void fmt_string(struct sink *s, const char *str, int width, int prec, int left)
{
    size_t len = 0;
    if (!str)
        str = "(null)";
    while (str[len] && (prec < 0 || len < (size_t)prec))
        len++;
    if (!left)
        sink_pad(s, ' ', width - (int)len);
    for (size_t i = 0; i < len; i++)
        sink_put(s, str[i]);
    if (left)
        sink_pad(s, ' ', width - (int)len);
}

static void fmt_number(struct sink *s, uint64_t v, int neg, unsigned base, int upper,
                       int width, int zero, int left)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    int len = n + (neg ? 1 : 0);
    if (!left && !zero)
        sink_pad(s, ' ', width - len);
    if (neg)
        sink_put(s, '-');
    if (!left && zero)
        sink_pad(s, '0', width - len);
    while (n > 0)
        sink_put(s, tmp[--n]);
    if (left)
        sink_pad(s, ' ', width - len);
}

static int vformat(struct sink *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            sink_put(s, *fmt);
            continue;
        }
        fmt++;
        int left = 0, zero = 0, width = 0, prec = -1, lng = 0;
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '0')
                zero = 1;
            else
                break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        while (*fmt == 'l' || *fmt == 'z') {
            lng = 1;    /* long, long long and size_t are all 64-bit here */
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            fmt_number(s, mag, v < 0, 10, 0, width, zero, left);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            fmt_number(s, v, 0, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, zero, left);
            break;
        }
        case 'p':
            sink_put(s, '0');
            sink_put(s, 'x');
            fmt_number(s, (uint64_t)va_arg(ap, void *), 0, 16, 0, width, zero, left);
            break;
        case 's':
            fmt_string(s, va_arg(ap, const char *), width, prec, left);
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            if (!left)
                sink_pad(s, ' ', width - 1);
            sink_put(s, c);
            if (left)
                sink_pad(s, ' ', width - 1);
            break;
        }
        case '%':
            sink_put(s, '%');
            break;
        case '\0':
            fmt--;      /* a lone '%' at the end: stop cleanly */
            break;
        default:        /* unknown conversion: print it as written */
            sink_put(s, '%');
            sink_put(s, *fmt);
            break;
        }
    }
    return (int)s->n;
}

int vprintf(const char *fmt, va_list ap)
{
    struct sink s = { NULL, 0, 0 };
    return vformat(&s, fmt, ap);
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int vsnprintf(char *buf, size_t cap, const char *fmt, va_list ap)
{
    char dummy;
    struct sink s = { cap ? buf : &dummy, cap, 0 };
    int n = vformat(&s, fmt, ap);
    if (cap)
        buf[s.n < cap ? s.n : cap - 1] = '\0';
    return n;
}

int snprintf(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

/* ------------------------------------------------------------------ */
/* Memory and strings                                                  */
/* ------------------------------------------------------------------ */
/*
 * Plain C loops, 8 bytes at a time where possible (x86 allows unaligned
 * accesses).  The Makefile builds with -fno-tree-loop-distribute-patterns so
 * gcc does not turn these loops back into calls to themselves.
 */
typedef uint64_t __attribute__((may_alias, aligned(1))) u64_unaligned;

void *memcpy(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    while (n >= 8) {
        *(u64_unaligned *)d = *(const u64_unaligned *)s;
        d += 8;
        s += 8;
        n -= 8;
    }
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    if (d == s || n == 0)
        return dst;
    if (d < s || d >= s + n)
        return memcpy(dst, src, n);     /* forward copy is safe */
    d += n;
    s += n;
    while (n >= 8) {
        d -= 8;
        s -= 8;
        n -= 8;
        *(u64_unaligned *)d = *(const u64_unaligned *)s;
    }
    while (n--)
        *--d = *--s;
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    uint8_t *d = dst;
    uint64_t w = (uint8_t)c * 0x0101010101010101UL;
    while (n >= 8) {
        *(u64_unaligned *)d = w;
        d += 8;
        n -= 8;
    }
    while (n--)
        *d++ = (uint8_t)c;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    while (n >= 8 && *(const u64_unaligned *)x == *(const u64_unaligned *)y) {
        x += 8;
        y += 8;
        n -= 8;
    }
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* ------------------------------------------------------------------ */
/* Clocks, timer, random numbers                                       */
/* ------------------------------------------------------------------ */

uint64_t vclock_ns(void)
{
    uint64_t lo = inl(CLOCK_VIRT_LO);   /* latches the 64-bit value */
    uint64_t hi = inl(CLOCK_VIRT_HI);
    return hi << 32 | lo;
}

uint64_t hostclock_ns(void)
{
    uint64_t lo = inl(CLOCK_HOST_LO);
    uint64_t hi = inl(CLOCK_HOST_HI);
    return hi << 32 | lo;
}

void timer_arm(uint64_t deadline_ns)
{
    outl(TIMER_DEADLINE_LO, (uint32_t)deadline_ns);
    outl(TIMER_DEADLINE_HI, (uint32_t)(deadline_ns >> 32));   /* arms */
}

void timer_disarm(void)
{
    outl(TIMER_DEADLINE_LO, 0);
    outl(TIMER_DEADLINE_HI, 0);
}

void sleep_ns(uint64_t ns)
{
    uint64_t deadline = vclock_ns() + ns;
    for (;;) {
        if (vclock_ns() >= deadline)
            break;
        /* Re-arm on every pass: hlt may also return early because an input
         * is waiting, and the timer disarms itself when it fires. */
        timer_arm(deadline);
        hlt();
    }
}

uint32_t rand32(void)
{
    return inl(RNG_PORT);
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */
/* ------------------------------------------------------------------ */

const char *cmdline(const struct boot_info *bi)
{
    if (!bi || bi->magic != BOOT_INFO_MAGIC || !bi->cmdline)
        return "";
    return (const char *)bi->cmdline;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

const char *arg_find(const struct boot_info *bi, const char *key, size_t *len)
{
    const char *p = cmdline(bi);
    size_t total = 0, klen = strlen(key);
    if (bi && bi->magic == BOOT_INFO_MAGIC)
        total = bi->cmdline_len > TOYVM_CMDLINE_MAX ? TOYVM_CMDLINE_MAX : bi->cmdline_len;
    const char *end = p + total;
    const char *found = NULL;
    size_t found_len = 0;
    while (p < end) {
        while (p < end && is_space(*p))
            p++;
        const char *tok = p;
        while (p < end && *p && !is_space(*p))
            p++;
        size_t tlen = (size_t)(p - tok);
        if (tlen > klen && tok[klen] == '=' && memcmp(tok, key, klen) == 0) {
            found = tok + klen + 1;         /* the last occurrence wins */
            found_len = tlen - klen - 1;
        }
        if (p < end && !*p)
            break;
    }
    if (len)
        *len = found_len;
    return found;
}

long arg_long(const struct boot_info *bi, const char *key, long def)
{
    size_t n;
    const char *v = arg_find(bi, key, &n);
    if (!v || n == 0)
        return def;
    size_t i = 0;
    int neg = 0;
    if (v[0] == '-' || v[0] == '+') {
        neg = v[0] == '-';
        i = 1;
    }
    unsigned base = 10;
    if (n - i > 2 && v[i] == '0' && (v[i + 1] == 'x' || v[i + 1] == 'X')) {
        base = 16;
        i += 2;
    }
    if (i == n)
        return def;
    uint64_t r = 0;
    for (; i < n; i++) {
        unsigned d;
        char c = v[i];
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            return def;
        if (r > (0x7FFFFFFFFFFFFFFFUL - d) / base)
            return def;     /* out of range */
        r = r * base + d;
    }
    return neg ? -(long)r : (long)r;
}

int arg_is(const struct boot_info *bi, const char *key, const char *want)
{
    size_t n;
    const char *v = arg_find(bi, key, &n);
    return v && n == strlen(want) && memcmp(v, want, n) == 0;
}

/* ------------------------------------------------------------------ */
/* Network device                                                      */
/* ------------------------------------------------------------------ */

uint32_t net_status(void)
{
    return inl(NET_STATUS);
}

/* Descriptors live in RAM below 4 GiB (RAM is at most 4 GiB), so their
 * address fits the 32-bit register. */
int net_recv(struct net_desc *d)
{
    outl(NET_RECV, (uint32_t)(uintptr_t)d);
    return (int)inl(NET_RESULT);
}

int net_send(struct net_desc *d)
{
    outl(NET_SEND, (uint32_t)(uintptr_t)d);
    return (int)inl(NET_RESULT);
}

static int send_event(struct net_desc *d)
{
    for (;;) {
        int r = net_send(d);
        if (r != NET_QUEUE_FULL)
            return r;
        hlt();      /* the host drains the output queue while we idle */
    }
}

int net_send_all(uint32_t conn, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len > 0) {
        size_t chunk = len > NET_MAX_SEND ? NET_MAX_SEND : len;
        struct net_desc d = {
            .kind = NET_EV_DATA, .conn = conn,
            .buf = (uint64_t)(uintptr_t)p, .cap = (uint32_t)chunk,
        };
        int r = send_event(&d);
        if (r != NET_OK)
            return r;
        p += chunk;
        len -= chunk;
    }
    return NET_OK;
}

int net_close(uint32_t conn)
{
    struct net_desc d = { .kind = NET_EV_CLOSE, .conn = conn };
    return send_event(&d);
}

/* ------------------------------------------------------------------ */
/* Power                                                               */
/* ------------------------------------------------------------------ */

void power_off(int code)
{
    outl(POWER_PORT, (uint32_t)code);
    for (;;)
        hlt();
}
