/*
 * resp.c - the RESP2 server loop shared by kvstore and noisy.
 *
 * Per DATA event: if the connection has no buffered partial request, the
 * event's bytes are parsed straight from the receive buffer; only an
 * incomplete tail is copied into the connection's own heap buffer.  Parsing
 * a buffered request again when more bytes arrive is cheap, because bulk
 * payloads are skipped by their length, not scanned.
 */
#include "resp.h"
#include "heap.h"

#define RX_CAP        (64U * 1024U)         /* receive buffer (longer events arrive in pieces) */
#define OUT_CAP       NET_MAX_SEND          /* replies are batched up to one SEND */
#define MAX_PENDING   (8U * 1024U * 1024U)  /* largest buffered partial request */
#define TABLE_INITIAL 2048U                 /* connection slots before the table grows */

struct resp_stats resp_stats;

/* ------------------------------------------------------------------ */
/* Connections: open addressing on the host's u32 id, linear probing   */
/* ------------------------------------------------------------------ */

struct conn {
    uint32_t id;
    uint32_t used;          /* slot holds a connection */
    uint8_t *buf;           /* buffered partial request (heap), or NULL */
    uint32_t len, cap;
};

static struct conn  table_initial[TABLE_INITIAL];
static struct conn *table = table_initial;
static uint32_t     table_bits = 11;        /* TABLE_INITIAL == 1 << table_bits */
static uint32_t     table_count;

static inline uint32_t table_mask(void) { return (1U << table_bits) - 1; }

static inline uint32_t home_slot(uint32_t id)
{
    return (uint32_t)(id * 2654435761U) >> (32 - table_bits);  /* Fibonacci hashing */
}

static struct conn *conn_find(uint32_t id)
{
    for (uint32_t i = home_slot(id);; i = (i + 1) & table_mask()) {
        struct conn *c = &table[i];
        if (!c->used)
            return NULL;
        if (c->id == id)
            return c;
    }
}

static struct conn *slot_for_insert(uint32_t id)
{
    uint32_t i = home_slot(id);
    while (table[i].used)
        i = (i + 1) & table_mask();
    return &table[i];
}

static void table_grow(void)
{
    uint32_t old_bits = table_bits;
    struct conn *old = table;
    struct conn *fresh = heap_alloc(sizeof(struct conn) << (old_bits + 1));
    if (!fresh)
        return;             /* stay at the current size; still correct */
    memset(fresh, 0, sizeof(struct conn) << (old_bits + 1));
    table = fresh;
    table_bits = old_bits + 1;
    for (uint32_t i = 0; i < (1U << old_bits); i++)
        if (old[i].used)
            *slot_for_insert(old[i].id) = old[i];
    if (old != table_initial)
        heap_free(old);
}

/* The connection with this id, created if new; NULL if the table is full. */
static struct conn *conn_get(uint32_t id)
{
    struct conn *c = conn_find(id);
    if (c)
        return c;
    if (2 * (table_count + 1) > (1U << table_bits))
        table_grow();
    if (table_count + 1 >= (1U << table_bits))
        return NULL;        /* keep one slot empty so probes end */
    c = slot_for_insert(id);
    c->id = id;
    c->used = 1;
    c->buf = NULL;
    c->len = c->cap = 0;
    table_count++;
    resp_stats.connections = table_count;
    return c;
}

/* Forget a connection (backward-shift deletion keeps probe chains intact). */
static void conn_drop(struct conn *c)
{
    heap_free(c->buf);
    uint32_t mask = table_mask();
    uint32_t hole = (uint32_t)(c - table);
    for (uint32_t j = (hole + 1) & mask; table[j].used; j = (j + 1) & mask) {
        uint32_t k = home_slot(table[j].id);
        /* entry j may move into the hole unless its home lies in (hole, j] */
        int stays = hole <= j ? (hole < k && k <= j) : (hole < k || k <= j);
        if (!stays) {
            table[hole] = table[j];
            hole = j;
        }
    }
    table[hole].used = 0;
    table[hole].buf = NULL;
    table[hole].len = table[hole].cap = 0;
    table_count--;
    resp_stats.connections = table_count;
}

static int conn_reserve(struct conn *c, size_t need)
{
    if (need <= c->cap)
        return 0;
    if (need > MAX_PENDING)
        return -1;
    size_t cap = c->cap ? (size_t)c->cap * 2 : 512;
    while (cap < need)
        cap *= 2;
    if (cap > MAX_PENDING)
        cap = MAX_PENDING;
    uint8_t *b = heap_realloc(c->buf, cap);
    if (!b)
        return -1;
    c->buf = b;
    c->cap = (uint32_t)cap;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Output                                                              */
/* ------------------------------------------------------------------ */

static uint8_t  outbuf[OUT_CAP];
static size_t   out_len;
static uint32_t out_conn;

static void out_flush(void)
{
    if (out_len) {
        net_send_all(out_conn, outbuf, out_len);
        out_len = 0;
    }
}

void reply_raw(const void *p, size_t n)
{
    const uint8_t *s = p;
    while (n) {
        if (out_len == 0 && n >= OUT_CAP) {
            /* whole chunks go out straight from the caller's memory (the
             * device copies at SEND time, so later changes cannot leak in) */
            size_t whole = n - n % OUT_CAP;
            net_send_all(out_conn, s, whole);
            s += whole;
            n -= whole;
            continue;
        }
        size_t take = OUT_CAP - out_len;
        if (take > n)
            take = n;
        memcpy(outbuf + out_len, s, take);
        out_len += take;
        s += take;
        n -= take;
        if (out_len == OUT_CAP)
            out_flush();
    }
}

void reply_crlf(void)
{
    reply_raw("\r\n", 2);
}

void reply_simple(const char *s)
{
    reply_raw("+", 1);
    reply_raw(s, strlen(s));
    reply_crlf();
}

void reply_error(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line + 1, sizeof line - 1, fmt, ap);
    va_end(ap);
    line[0] = '-';
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    for (int i = 1; i <= n; i++)        /* an error is one line */
        if (line[i] == '\r' || line[i] == '\n')
            line[i] = ' ';
    reply_raw(line, (size_t)n + 1);
    reply_crlf();
}

void reply_int(int64_t v)
{
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, ":%ld\r\n", v);
    reply_raw(tmp, (size_t)n);
}

void reply_bulk_header(size_t n)
{
    char tmp[32];
    int k = snprintf(tmp, sizeof tmp, "$%lu\r\n", n);
    reply_raw(tmp, (size_t)k);
}

void reply_bulk(const void *p, size_t n)
{
    reply_bulk_header(n);
    reply_raw(p, n);
    reply_crlf();
}

void reply_null(void)
{
    reply_raw("$-1\r\n", 5);
}

void reply_oom(void)
{
    reply_error("OOM command not allowed when used memory > 'maxmemory'");
}

/* The argument as it may appear inside an error line: at most 128 bytes,
 * control characters and quotes replaced by spaces. */
static void printable_name(const struct resp_arg *a, char *out, size_t cap)
{
    size_t n = a->len < cap - 1 ? a->len : cap - 1;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = a->p[i];
        out[i] = (c < 0x20 || c >= 0x7F || c == '\'') ? ' ' : (char)c;
    }
    out[n] = '\0';
}

void reply_unknown_command(const struct resp_arg *name)
{
    char tmp[129];
    printable_name(name, tmp, sizeof tmp);
    reply_error("ERR unknown command '%s'", tmp);
}

void reply_wrong_arity(const struct resp_arg *name)
{
    char tmp[129];
    printable_name(name, tmp, sizeof tmp);
    for (char *p = tmp; *p; p++)        /* Redis names the command in lower case */
        if (*p >= 'A' && *p <= 'Z')
            *p = (char)(*p - 'A' + 'a');
    reply_error("ERR wrong number of arguments for '%s' command", tmp);
}

int resp_arg_is(const struct resp_arg *a, const char *word)
{
    size_t i = 0;
    for (; i < a->len; i++) {
        uint8_t c = a->p[i];
        if (c >= 'A' && c <= 'Z')
            c = (uint8_t)(c - 'A' + 'a');
        if (!word[i] || c != (uint8_t)word[i])
            return 0;
    }
    return word[i] == '\0';
}

int resp_arg_int(const struct resp_arg *a, int64_t *out)
{
    const uint8_t *p = a->p;
    size_t n = a->len, i = 0;
    if (n == 0 || n > 20)
        return -1;
    int neg = 0;
    if (p[0] == '-') {
        neg = 1;
        i = 1;
        if (n == 1)
            return -1;
    }
    if (p[i] == '0' && n > i + 1)
        return -1;              /* leading zeros are not canonical */
    if (neg && p[i] == '0')
        return -1;              /* "-0" */
    uint64_t v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        uint64_t d = p[i] - '0';
        if (v > (0xFFFFFFFFFFFFFFFFUL - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > 0x8000000000000000UL)
            return -1;
        *out = (int64_t)(0 - v);
    } else {
        if (v > 0x7FFFFFFFFFFFFFFFUL)
            return -1;
        *out = (int64_t)v;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Parsing                                                             */
/* ------------------------------------------------------------------ */

enum { P_OK, P_INCOMPLETE, P_ERROR, P_OOM };

static struct resp_arg  argv_initial[64];
static struct resp_arg *argv = argv_initial;
static size_t           argv_cap = 64;
static char             parse_error[96];

static int argv_reserve(size_t n)
{
    if (n <= argv_cap)
        return 0;
    size_t cap = argv_cap * 2;
    while (cap < n)
        cap *= 2;
    struct resp_arg *a = heap_alloc(cap * sizeof *a);
    if (!a)
        return -1;
    memcpy(a, argv, argv_cap * sizeof *a);
    if (argv != argv_initial)
        heap_free(argv);
    argv = a;
    argv_cap = cap;
    return 0;
}

/* A "<type><integer>\r\n" line starting at p[pos]. */
static int read_count(const uint8_t *p, size_t n, size_t pos, int64_t *val, size_t *next)
{
    size_t i = pos + 1;
    while (i < n && p[i] != '\r') {
        if (i - pos > 20)
            return P_ERROR;     /* no integer is that long */
        i++;
    }
    if (i + 1 >= n)
        return P_INCOMPLETE;
    if (p[i + 1] != '\n')
        return P_ERROR;
    size_t d = pos + 1;
    int neg = 0;
    if (d < i && p[d] == '-') {
        neg = 1;
        d++;
    }
    if (d == i || i - d > 18)
        return P_ERROR;
    int64_t v = 0;
    for (; d < i; d++) {
        if (p[d] < '0' || p[d] > '9')
            return P_ERROR;
        v = v * 10 + (p[d] - '0');
    }
    *val = neg ? -v : v;
    *next = i + 2;
    return P_OK;
}

static int parse_multibulk(const uint8_t *p, size_t n, size_t *consumed, int *argc)
{
    int64_t count, len;
    size_t pos;
    int r = read_count(p, n, 0, &count, &pos);
    if (r == P_INCOMPLETE)
        return r;
    if (r == P_ERROR || count > (int64_t)RESP_MAX_ARGS) {
        snprintf(parse_error, sizeof parse_error, "ERR Protocol error: invalid multibulk length");
        return P_ERROR;
    }
    if (count <= 0) {           /* empty command: skip it */
        *consumed = pos;
        *argc = 0;
        return P_OK;
    }
    for (int64_t k = 0; k < count; k++) {
        if (pos >= n)
            return P_INCOMPLETE;
        if (p[pos] != '$') {
            char c = (p[pos] >= 0x20 && p[pos] < 0x7F) ? (char)p[pos] : '?';
            snprintf(parse_error, sizeof parse_error, "ERR Protocol error: expected '$', got '%c'", c);
            return P_ERROR;
        }
        size_t data;
        r = read_count(p, n, pos, &len, &data);
        if (r == P_INCOMPLETE)
            return r;
        if (r == P_ERROR || len < 0 || len > (int64_t)RESP_MAX_BULK) {
            snprintf(parse_error, sizeof parse_error, "ERR Protocol error: invalid bulk length");
            return P_ERROR;
        }
        if (n - data < (size_t)len + 2)
            return P_INCOMPLETE;
        if (argv_reserve((size_t)k + 1))    /* grows by doubling */
            return P_OOM;
        argv[k].p = p + data;
        argv[k].len = (size_t)len;
        pos = data + (size_t)len + 2;   /* the trailing CRLF is skipped, as Redis does */
    }
    *consumed = pos;
    *argc = (int)count;
    return P_OK;
}

/* An inline command: one line, arguments separated by spaces or tabs. */
static int parse_inline(const uint8_t *p, size_t n, size_t *consumed, int *argc)
{
    size_t nl = 0;
    while (nl < n && p[nl] != '\n')
        nl++;
    if (nl == n) {
        if (n > RESP_MAX_INLINE) {
            snprintf(parse_error, sizeof parse_error, "ERR Protocol error: too big inline request");
            return P_ERROR;
        }
        return P_INCOMPLETE;
    }
    size_t end = nl;
    if (end > 0 && p[end - 1] == '\r')
        end--;
    int k = 0;
    size_t i = 0;
    for (;;) {
        while (i < end && (p[i] == ' ' || p[i] == '\t'))
            i++;
        if (i >= end)
            break;
        size_t start = i;
        while (i < end && p[i] != ' ' && p[i] != '\t')
            i++;
        if (argv_reserve((size_t)k + 1))
            return P_OOM;
        argv[k].p = p + start;
        argv[k].len = i - start;
        k++;
    }
    *consumed = nl + 1;
    *argc = k;
    return P_OK;
}

static int parse_command(const uint8_t *p, size_t n, size_t *consumed, int *argc)
{
    if (p[0] == '*')
        return parse_multibulk(p, n, consumed, argc);
    return parse_inline(p, n, consumed, argc);
}

/* ------------------------------------------------------------------ */
/* The event loop                                                      */
/* ------------------------------------------------------------------ */

static uint8_t rxbuf[RX_CAP] __attribute__((aligned(64)));

/*
 * Connections we closed ourselves.  What the client sent before the host
 * saw our CLOSE may still be queued in the device (a long event arrives in
 * pieces); it must not be parsed as a new connection's requests.  The host
 * need not report CLOSE for a connection the guest closed, so instead of
 * keeping table entries forever we remember the last few ids in a ring.
 */
#define CLOSED_RING 64
static uint32_t closed_ids[CLOSED_RING];
static uint8_t  closed_valid[CLOSED_RING];
static uint32_t closed_next;

static int closed_find(uint32_t id)
{
    for (int i = 0; i < CLOSED_RING; i++)
        if (closed_valid[i] && closed_ids[i] == id)
            return i;
    return -1;
}

static void closed_forget(uint32_t id)
{
    int i = closed_find(id);
    if (i >= 0)
        closed_valid[i] = 0;
}

static void closed_remember(uint32_t id)
{
    closed_ids[closed_next] = id;
    closed_valid[closed_next] = 1;
    closed_next = (closed_next + 1) % CLOSED_RING;
}

/* Reply with an error, send it and close the connection, as Redis does on
 * a protocol error. */
static void fail_connection(struct conn *c, int oom)
{
    if (oom)
        reply_oom();
    else
        reply_error("%s", parse_error);
    out_flush();
    net_close(c->id);
    closed_remember(c->id);
    conn_drop(c);
}

static void on_data(uint32_t id, const uint8_t *data, size_t n, resp_handler handler)
{
    out_conn = id;
    out_len = 0;
    struct conn *c = conn_find(id);
    if (!c) {
        if (closed_find(id) >= 0)
            return;             /* the tail of a connection we closed */
        c = conn_get(id);       /* data without OPEN: accept it as a new connection */
    }
    if (!c) {
        reply_error("ERR max number of clients reached");
        out_flush();
        net_close(id);
        closed_remember(id);
        return;
    }
    const uint8_t *src = data;
    size_t len = n;
    if (c->len) {               /* continue a buffered partial request */
        if (conn_reserve(c, (size_t)c->len + n)) {
            fail_connection(c, 1);
            return;
        }
        memcpy(c->buf + c->len, data, n);
        c->len += (uint32_t)n;
        src = c->buf;
        len = c->len;
    }
    size_t pos = 0;
    while (pos < len) {
        size_t used = 0;
        int argc = 0;
        int r = parse_command(src + pos, len - pos, &used, &argc);
        if (r == P_INCOMPLETE)
            break;
        if (r != P_OK) {
            fail_connection(c, r == P_OOM);
            return;
        }
        if (argc > 0) {
            handler(argc, argv);
            resp_stats.commands++;
        }
        pos += used;
    }
    size_t rest = len - pos;
    if (src == c->buf) {
        if (rest == 0) {
            heap_free(c->buf);
            c->buf = NULL;
            c->len = c->cap = 0;
        } else {
            if (pos)
                memmove(c->buf, c->buf + pos, rest);
            c->len = (uint32_t)rest;
        }
    } else if (rest) {
        if (conn_reserve(c, rest)) {
            out_flush();        /* answer what was complete first */
            fail_connection(c, 1);
            return;
        }
        memcpy(c->buf, src + pos, rest);
        c->len = (uint32_t)rest;
    }
    out_flush();
}

void resp_serve(resp_handler handler)
{
    for (;;) {
        struct net_desc d = { .buf = (uint64_t)(uintptr_t)rxbuf, .cap = RX_CAP };
        int r = net_recv(&d);
        if (r == NET_NO_INPUT) {
            hlt();              /* the host wakes us when input arrives */
            continue;
        }
        if (r != NET_OK)
            continue;
        switch (d.kind) {
        case NET_EV_OPEN: {
            closed_forget(d.conn);      /* the id may be reused */
            struct conn *c = conn_find(d.conn);
            if (c)
                conn_drop(c);           /* a new connection: forget any old state */
            if (!conn_get(d.conn))
                net_close(d.conn);      /* no room: refuse it */
            break;
        }
        case NET_EV_DATA:
            if (d.len > 0)
                on_data(d.conn, rxbuf, d.len > RX_CAP ? RX_CAP : d.len, handler);
            break;
        case NET_EV_CLOSE: {
            closed_forget(d.conn);
            struct conn *c = conn_find(d.conn);
            if (c) {
                conn_drop(c);
                net_close(d.conn);      /* answer the client's close: the host may now drop the socket */
            }
            break;
        }
        default:
            break;
        }
    }
}
