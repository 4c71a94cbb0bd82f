/* hello - the smallest guest: greet, echo the command line, exit 0. */
#include "runtime/toyvm.h"

int main(const struct boot_info *bi)
{
    puts("Hello from a toyvm guest!");
    printf("cmdline: %s\n", cmdline(bi));
    return 0;
}
