/* Entry point of every test guest: the first byte of the flat image (section .text.start).
 *
 * On entry (all vCPUs at once): 64-bit long mode, paging on, interrupts off, RSP = 0,
 * RDI = vCPU index, RSI = vCPU count, RDX = args string address, RCX = RAM size.
 * Each vCPU gets guest_stacks[RDI] (16 KiB) and calls guest_entry(cpu, ncpus, args, ram) with the
 * registers exactly as received. vCPUs with an index >= GUEST_MAX_CPUS have no stack: they halt
 * here (vCPU 0 reports the bad vCPU count from guest_entry). */
#define GUEST_MAX_CPUS 64
#define GUEST_STACK_SHIFT 14 /* 16 KiB, GUEST_STACK_SIZE in guest.h */

    .section .text.start, "ax", @progbits
    .code64
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    cmpq $GUEST_MAX_CPUS, %rdi
    jae 1f
    movq %rdi, %rax
    incq %rax
    shlq $GUEST_STACK_SHIFT, %rax
    leaq guest_stacks(%rip), %rsp
    addq %rax, %rsp              /* top of this vCPU's stack, 16-byte aligned */
    xorl %ebp, %ebp
    call guest_entry             /* noreturn; fall through to halt just in case */
1:  cli
    hlt
    jmp 1b
    .size _start, . - _start

    .section .note.GNU-stack, "", @progbits
