/*
 * resp.h - a Redis-protocol (RESP2) server over the toyvm network device.
 *
 * resp_serve() owns the event loop: it tracks connections (ids are arbitrary
 * u32 chosen by the host), reassembles requests split across DATA events,
 * parses pipelined requests (multibulk and inline), and calls the guest's
 * handler once per command.  The handler answers with the reply_* functions;
 * replies to one DATA event are batched into as few SENDs as possible.
 * Connection buffers come from the heap (heap.h), which the guest sets up
 * before calling resp_serve().
 */
#ifndef TOYVM_RESP_H
#define TOYVM_RESP_H

#include "toyvm.h"

#define RESP_MAX_BULK     (512U * 1024U)   /* largest key or value */
#define RESP_MAX_INLINE   (64U * 1024U)    /* longest inline command line */
#define RESP_MAX_ARGS     (1024U * 1024U)  /* most arguments in one command */

struct resp_arg {
    const uint8_t *p;
    size_t len;
};

/* Called once per command, argc >= 1.  The arguments point into a buffer
 * that stays valid only during the call. */
typedef void (*resp_handler)(int argc, const struct resp_arg *argv);

void resp_serve(resp_handler handler) __attribute__((noreturn));

/* Replies (appended to the current connection's output). */
void reply_raw(const void *p, size_t n);
void reply_simple(const char *s);                   /* +s */
void reply_error(const char *fmt, ...)              /* -<formatted> */
        __attribute__((format(printf, 1, 2)));
void reply_int(int64_t v);                          /* :v */
void reply_bulk(const void *p, size_t n);           /* $n + data */
void reply_bulk_header(size_t n);                   /* $n; then n bytes by reply_raw, then reply_crlf */
void reply_crlf(void);
void reply_null(void);                              /* $-1 */
void reply_oom(void);                               /* the maxmemory error */
void reply_unknown_command(const struct resp_arg *name);
void reply_wrong_arity(const struct resp_arg *name);

/* 1 if a equals word, ignoring ASCII case (word is given in lower case). */
int  resp_arg_is(const struct resp_arg *a, const char *word);
/* Parse a as a signed 64-bit decimal integer, strictly (no spaces, no '+',
 * no leading zeros).  Returns 0 on success. */
int  resp_arg_int(const struct resp_arg *a, int64_t *out);

/* Statistics, for the curious. */
struct resp_stats {
    uint64_t connections;       /* currently open */
    uint64_t commands;          /* executed since start */
};
extern struct resp_stats resp_stats;

#endif
