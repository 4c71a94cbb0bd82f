/*
 * start.S - guest entry point.
 *
 * The host enters here (the first byte of the image, 0x100000) with
 * RDI = boot-info block, RSP = top of RAM (16-byte aligned), paging off.
 * We clear .bss, call main(bi), and hand main's return value to the power
 * port.  If the VM somehow keeps running, we idle forever.
 */
    .section .text.start, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    mov     %rdi, %rbx              /* keep the boot-info pointer (callee-saved) */

    /* zero .bss: __bss_start and _end are 8-byte aligned by linker.ld */
    lea     __bss_start(%rip), %rdi
    lea     _end(%rip), %rcx
    sub     %rdi, %rcx
    shr     $3, %rcx
    xor     %eax, %eax
    cld
    rep stosq

    mov     %rbx, %rdi
    xor     %ebp, %ebp              /* terminate frame-pointer chains */
    call    main                    /* RSP was 16-aligned: ABI-correct call */

    mov     $0x500, %edx            /* POWER_PORT: exit code = low 8 bits */
    out     %eax, %dx
1:  hlt
    jmp     1b
    .size _start, . - _start

    .section .note.GNU-stack, "", @progbits
