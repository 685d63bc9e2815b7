//! Multiboot header and the 32-bit entry stub that switches the CPU to long mode.
//!
//! QEMU's multiboot loader enters `_start32` in 32-bit protected mode with paging
//! off, `eax` = multiboot magic and `ebx` = physical address of the multiboot info.
//! The stub
//!
//! 1. identity-maps the first 1 GiB with 2 MiB pages (the kernel is linked at
//!    1 MiB and runs there; its page tables, stacks and statics all live below 1 GiB),
//! 2. enables what the precompiled `core` needs before any Rust code runs: SSE
//!    (CR0.EM clear, CR0.MP, CR4.OSFXSR, CR4.OSXMMEXCPT),
//! 3. sets CR4.PAE, EFER.LME and EFER.NXE (checks test NX mappings), CR0.WP (so
//!    read-only pages are read-only for the kernel too) and CR0.PG,
//! 4. far-jumps through a minimal GDT into 64-bit code, which calls
//!    `kmain(magic, multiboot_info)`.
//!
//! Everything else about the address space (the physical-memory map at
//! [`PHYS_OFFSET`](crate::paging::PHYS_OFFSET), the scratch window) is built in Rust by
//! [`crate::paging`].

/// Size of the stack `kmain` and every check runs on.
pub const BOOT_STACK_SIZE: usize = 256 * 1024;

core::arch::global_asm!(
    r#"
.section .multiboot, "a"
.p2align 2
multiboot_header:
    .long 0x1BADB002                    /* magic */
    .long 0x00000003                    /* flags: page-align modules, memory info */
    .long -(0x1BADB002 + 0x00000003)    /* checksum */

.section .bss.boot, "aw", @nobits
.p2align 12
.global boot_pml4
boot_pml4:      .skip 4096
boot_pdpt_low:  .skip 4096
boot_pd_low:    .skip 4096
.global boot_stack_bottom
boot_stack_bottom:
    .skip {stack_size}
.global boot_stack_top
boot_stack_top:

.section .rodata.boot, "a"
.p2align 4
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff            /* 0x10: data, DPL 0 */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

.section .text.boot, "ax"
.code32
.global _start32
_start32:
    cli
    cld
    movl $boot_stack_top, %esp
    movl %eax, %edi                     /* kmain's first argument: magic */
    movl %ebx, %esi                     /* second: multiboot info */

    movl $boot_pdpt_low, %eax
    orl $0x3, %eax                      /* present | writable */
    movl %eax, boot_pml4
    movl $boot_pd_low, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt_low

    xorl %ecx, %ecx                     /* PD_low[i] = i * 2 MiB | huge | writable | present */
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd_low(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jne 1b

    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax   /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    movl $0xC0000080, %ecx              /* IA32_EFER */
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax   /* LME, NXE */
    wrmsr

    movl %cr0, %eax
    andl $~(1 << 2), %eax               /* EM off: SSE instructions run */
    orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax   /* PG, WP, MP, PE */
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

.code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movabsq $boot_stack_top, %rsp
    movl %edi, %edi                     /* upper halves are undefined after the switch */
    movl %esi, %esi
    call kmain
2:  hlt
    jmp 2b
.text
"#,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);
