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
//! Application processors enter at `ap_trampoline_start`, copied by
//! [`crate::smp::start_aps`] to [`TRAMPOLINE`](crate::smp::TRAMPOLINE) because a
//! STARTUP IPI starts a CPU in real mode in the first MiB. The trampoline loads a GDT
//! of its own (addressed from its copy), turns on protection and far-jumps to
//! `ap_start32` in the image, which takes the same steps 2 to 4 as the bootstrap CPU,
//! on the CR3 and stack `smp` left for it, and calls `ap_main(index)`.
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

    movl $boot_pml4, %eax
    call enable_long_mode
    ljmp $0x08, $long_mode_entry

/* Steps 2 and 3 with the PML4 at eax, and the 64-bit GDT loaded: returns in
   compatibility mode, for the caller's far jump. Clobbers eax, ecx, edx. */
enable_long_mode:
    movl %eax, %cr3
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax   /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4

    movl $0xC0000080, %ecx              /* IA32_EFER */
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax   /* LME, NXE */
    wrmsr

    movl %cr0, %eax
    andl $~(1 << 2), %eax               /* EM off: SSE instructions run */
    orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax   /* PG, WP, MP, PE */
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ret

/* An application processor, from the trampoline: flat 32-bit segments, paging off. */
ap_start32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl AP_BOOT_STACK_TOP, %esp
    movl AP_BOOT_CR3, %eax
    call enable_long_mode
    ljmp $0x08, $ap_long_mode

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

ap_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq AP_BOOT_STACK_TOP(%rip), %rsp
    movq AP_BOOT_INDEX(%rip), %rdi
    call ap_main
3:  hlt
    jmp 3b

/* Copied to {trampoline} and run there in real mode with CS = {trampoline} >> 4: its
   own addresses are offsets from its start. */
.section .rodata.ap_trampoline, "a"
.code16
.global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_ptr - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax                        /* PE */
    movl %eax, %cr0
    ljmpl $0x08, $ap_start32
.p2align 3
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff            /* 0x08: 32-bit code, DPL 0 */
    .quad 0x00cf92000000ffff            /* 0x10: data, DPL 0 */
ap_gdt_ptr:
    .word ap_gdt_ptr - ap_gdt - 1
    .long {trampoline} + (ap_gdt - ap_trampoline_start)
.global ap_trampoline_end
ap_trampoline_end:
.code64
.text
"#,
    stack_size = const BOOT_STACK_SIZE,
    trampoline = const crate::smp::TRAMPOLINE,
    options(att_syntax)
);
