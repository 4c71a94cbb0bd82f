/*
 * counter - ticks on the virtual clock.
 *   count=N        ticks to print (default 10)
 *   interval_ms=M  virtual milliseconds between ticks (default 100)
 * Sleeps with the timer and hlt, so the host idles instead of spinning; the
 * printed times are virtual, hence the same on every run.
 */
#include "runtime/toyvm.h"

int main(const struct boot_info *bi)
{
    long count = arg_long(bi, "count", 10);
    long interval_ms = arg_long(bi, "interval_ms", 100);
    if (interval_ms < 0)
        interval_ms = 0;
    for (long i = 1; i <= count; i++) {
        sleep_ns((uint64_t)interval_ms * 1000000UL);
        printf("tick %ld at %lu ms\n", i, vclock_ns() / 1000000UL);
    }
    return 0;
}
