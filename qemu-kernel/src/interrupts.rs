//! A GDT with a TSS per CPU, and the IDT all CPUs share.
//!
//! Every exception and interrupt handler runs on an IST stack: the precompiled `core`
//! uses the red zone, so an interrupt must never push onto the stack of the code it
//! interrupts. Each CPU has its own IST stacks (in its own TSS), so two CPUs can fault
//! at once. The interrupt vectors (shootdown, wake-up, timer, spurious) share one IST slot:
//! their gates clear IF, so they never nest. Page faults go to [`crate::fault::page_fault`], which recovers
//! faulting probes; every other exception the kernel can take prints its frame and
//! ends the run with failure (without a handler it would triple-fault, and QEMU with
//! `-no-reboot` exits with status 0).
//!
//! Handlers are entered through naked stubs that save the caller-saved registers and
//! the SSE state, pass a [`TrapFrame`] to Rust and return with `iretq`.

use crate::cell::{PageAligned, StaticCell};
use core::arch::naked_asm;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;

use crate::smp::MAX_CPUS;

const IST_STACK_SIZE: usize = 32 * 1024;
/// IST slot (0-based, as the `x86_64` crate counts) of the page-fault stack.
const PAGE_FAULT_IST: u16 = 0;
/// IST slot of the double-fault stack, separate so a fault in the page-fault
/// handler still reports.
const DOUBLE_FAULT_IST: u16 = 1;
/// IST slot of the other fatal exceptions.
const FATAL_IST: u16 = 2;
/// IST slot of the interrupt vectors.
const INTERRUPT_IST: u16 = 3;
const IST_SLOTS: usize = 4;

/// Vector of the TLB shootdown IPI.
pub const SHOOTDOWN_VECTOR: u8 = 0xf0;
/// Vector of the IPI that wakes a halted CPU to look for work.
pub const WAKE_VECTOR: u8 = 0xf1;
/// Vector of the local APIC timer, which checks start and stop.
pub const TIMER_VECTOR: u8 = 0xe0;

type IstStacks = [[u8; IST_STACK_SIZE]; IST_SLOTS];

static IST_STACKS: StaticCell<PageAligned<[IstStacks; MAX_CPUS]>> =
    StaticCell::new(PageAligned([[[0; IST_STACK_SIZE]; IST_SLOTS]; MAX_CPUS]));
static TSS: [Once<TaskStateSegment>; MAX_CPUS] = [const { Once::new() }; MAX_CPUS];
static GDT: [Once<(GlobalDescriptorTable, Selectors)>; MAX_CPUS] =
    [const { Once::new() }; MAX_CPUS];
static IDT: Once<InterruptDescriptorTable> = Once::new();

struct Selectors {
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

/// What the entry stubs save, lowest address first: the caller-saved registers, then
/// the hardware frame (with the error code, or 0 for exceptions without one).
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    // Caller-saved registers of the interrupted code, restored on return.
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    /// The exception's error code (0 when it pushes none).
    pub error_code: u64,
    /// Where execution resumes; a handler may redirect it.
    pub rip: u64,
    /// Code segment of the interrupted code.
    pub cs: u64,
    /// Flags of the interrupted code.
    pub rflags: u64,
    /// Stack pointer of the interrupted code; a handler may adjust it.
    pub rsp: u64,
    /// Stack segment of the interrupted code.
    pub ss: u64,
}

/// A naked entry stub: push a 0 error code if the CPU pushed none, save the
/// caller-saved registers and the FPU/SSE state, call `$handler(&mut TrapFrame)`,
/// restore and `iretq`. The CPU aligns RSP to 16 on an IST switch, so after its 6
/// (with the error code) quadwords and our 9 the stub pads by 8 for `fxsave`.
macro_rules! entry_stub {
    ($name:ident, $handler:path, error_code = false) => {
        entry_stub!(@emit $name, $handler, "push 0");
    };
    ($name:ident, $handler:path, error_code = true) => {
        entry_stub!(@emit $name, $handler, "");
    };
    (@emit $name:ident, $handler:path, $push_code:literal) => {
        #[unsafe(naked)]
        extern "C" fn $name() {
            naked_asm!(
                $push_code,
                "push rax", "push rcx", "push rdx", "push rsi", "push rdi",
                "push r8", "push r9", "push r10", "push r11",
                "mov rdi, rsp",
                "sub rsp, 520",
                "fxsave64 [rsp]",
                "call {handler}",
                "fxrstor64 [rsp]",
                "add rsp, 520",
                "pop r11", "pop r10", "pop r9", "pop r8",
                "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rax",
                "add rsp, 8",
                "iretq",
                handler = sym $handler,
            )
        }
    };
}

entry_stub!(
    page_fault_entry,
    crate::fault::page_fault,
    error_code = true
);
entry_stub!(double_fault_entry, double_fault, error_code = true);
entry_stub!(
    general_protection_entry,
    general_protection,
    error_code = true
);
entry_stub!(invalid_opcode_entry, invalid_opcode, error_code = false);
entry_stub!(divide_error_entry, divide_error, error_code = false);
entry_stub!(simd_error_entry, simd_error, error_code = false);
entry_stub!(shootdown_entry, shootdown, error_code = false);
entry_stub!(wake_entry, wake, error_code = false);
entry_stub!(timer_entry, timer, error_code = false);
entry_stub!(spurious_entry, spurious, error_code = false);

fn fatal(name: &str, frame: &TrapFrame) -> ! {
    crate::println!(
        "\nfatal: {name} at rip {:#x} (error code {:#x}, rsp {:#x})",
        frame.rip,
        frame.error_code,
        frame.rsp
    );
    crate::serial::exit(false)
}

extern "C" fn double_fault(frame: &mut TrapFrame) {
    fatal("double fault", frame)
}
extern "C" fn general_protection(frame: &mut TrapFrame) {
    fatal("general protection fault", frame)
}
extern "C" fn invalid_opcode(frame: &mut TrapFrame) {
    fatal("invalid opcode", frame)
}
extern "C" fn divide_error(frame: &mut TrapFrame) {
    fatal("divide error", frame)
}
extern "C" fn simd_error(frame: &mut TrapFrame) {
    fatal("SIMD floating-point exception", frame)
}

extern "C" fn shootdown(_frame: &mut TrapFrame) {
    crate::smp::TLB.handle_ipi();
    // The shootdown of a check's own manager, while that check routes it here.
    crate::checks::serve_check_shootdown();
    crate::lapic::end_of_interrupt();
}
extern "C" fn wake(_frame: &mut TrapFrame) {
    crate::lapic::end_of_interrupt();
}
extern "C" fn timer(_frame: &mut TrapFrame) {
    crate::checks::timer_tick();
    crate::lapic::end_of_interrupt();
}
/// A spurious interrupt is not in service: no end of interrupt.
extern "C" fn spurious(_frame: &mut TrapFrame) {}

fn ist_stack_top(cpu: usize, slot: u16) -> VirtAddr {
    let stacks = IST_STACKS.get().cast::<IstStacks>();
    // SAFETY: `cpu < MAX_CPUS` and `slot < IST_SLOTS`, in bounds of the arrays; only
    // the address is computed.
    let stack = unsafe {
        stacks
            .add(cpu)
            .cast::<[u8; IST_STACK_SIZE]>()
            .add(usize::from(slot))
    };
    VirtAddr::from_ptr(stack) + IST_STACK_SIZE as u64
}

/// Loads CPU `cpu`'s GDT and TSS (with its own IST stacks) and the shared IDT. Each
/// CPU calls it once, for its own index, before it enables interrupts.
pub fn init_cpu(cpu: usize) {
    assert!(cpu < MAX_CPUS, "CPU index {cpu} past MAX_CPUS");
    let tss = TSS[cpu].call_once(|| {
        let mut tss = TaskStateSegment::new();
        for slot in [PAGE_FAULT_IST, DOUBLE_FAULT_IST, FATAL_IST, INTERRUPT_IST] {
            tss.interrupt_stack_table[usize::from(slot)] = ist_stack_top(cpu, slot);
        }
        tss
    });
    let (gdt, selectors) = GDT[cpu].call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, with matching descriptor types.
    unsafe {
        CS::set_reg(selectors.code);
        DS::set_reg(selectors.data);
        ES::set_reg(selectors.data);
        SS::set_reg(selectors.data);
        load_tss(selectors.tss);
    }
    IDT.call_once(build_idt).load();
}

fn build_idt() -> InterruptDescriptorTable {
    let mut idt = InterruptDescriptorTable::new();
    let addr = |stub: extern "C" fn()| VirtAddr::new(stub as usize as u64);
    // SAFETY: each address is a naked stub following the interrupt calling convention
    // of its vector (error code pushed or not, as its `entry_stub!` says), and every IST
    // slot named is set in the TSS loaded before this IDT.
    unsafe {
        idt.page_fault
            .set_handler_addr(addr(page_fault_entry))
            .set_stack_index(PAGE_FAULT_IST);
        idt.double_fault
            .set_handler_addr(addr(double_fault_entry))
            .set_stack_index(DOUBLE_FAULT_IST);
        idt.general_protection_fault
            .set_handler_addr(addr(general_protection_entry))
            .set_stack_index(FATAL_IST);
        idt.invalid_opcode
            .set_handler_addr(addr(invalid_opcode_entry))
            .set_stack_index(FATAL_IST);
        idt.divide_error
            .set_handler_addr(addr(divide_error_entry))
            .set_stack_index(FATAL_IST);
        idt.simd_floating_point
            .set_handler_addr(addr(simd_error_entry))
            .set_stack_index(FATAL_IST);
        for (vector, stub) in [
            (SHOOTDOWN_VECTOR, shootdown_entry as extern "C" fn()),
            (WAKE_VECTOR, wake_entry),
            (TIMER_VECTOR, timer_entry),
            (crate::lapic::SPURIOUS_VECTOR, spurious_entry),
        ] {
            idt[vector]
                .set_handler_addr(addr(stub))
                .set_stack_index(INTERRUPT_IST);
        }
    }
    idt
}
