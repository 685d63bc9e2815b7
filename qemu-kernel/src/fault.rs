//! Fault recovery: probes that touch memory which may not be mapped, and the
//! page-fault handler that turns their faults into errors.
//!
//! This is the exception table Linux uses for user-memory access. Each probe is a
//! short assembly routine whose one faulting instruction has a known recovery
//! address; the pair `(instruction, recovery)` is emitted into the `.ex_table`
//! section, which the linker script brackets with `__ex_table_start/end`. When a page
//! fault's RIP is in the table, the handler records CR2 and the error code and
//! resumes at the recovery address, which makes the probe return "faulted".
//!
//! An instruction fetch fault has no faulting instruction inside the probe: RIP is
//! the target address itself (and equals CR2). `probe_exec` therefore records its
//! target and `call`s it; a fetch fault with RIP == CR2 == the recorded target can
//! only come from that `call`, so the handler pops the return address the `call`
//! pushed and resumes at the probe's recovery label.
//!
//! `run_on_stack` runs a function on another stack (a vmalloc'd kernel stack) and
//! records the stack's unmapped guard below it. A fault there (the function overflowed
//! the stack) is taken on the handler's IST stack, so it is not a double fault; the
//! handler puts back the stack pointer the caller had and resumes at the probe's
//! recovery label, which returns "faulted".
//!
//! Any other page fault is a bug: the handler prints it, with the vmalloc manager's
//! diagnosis of the address (which area, which page, guard page or use after free,
//! and where the area was allocated), and ends the run with failure.

use crate::interrupts::TrapFrame;
use crate::smp::{MAX_CPUS, cpu_index};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::VirtAddr;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::PageFaultErrorCode;

/// A page fault a probe caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (CR2).
    pub addr: VirtAddr,
    /// The page-fault error code: P, W/R, U/S, RSVD, I/D, ...
    pub code: PageFaultErrorCode,
}

core::arch::global_asm!(
    r#"
.section .text.probe, "ax"

/* u64 vm_probe_read(u64 addr, u64 *out): 0 and *out = [addr], or 1 on a fault */
.global vm_probe_read
vm_probe_read:
    xor eax, eax
.Lprobe_read_insn:
    mov rdx, qword ptr [rdi]
    mov qword ptr [rsi], rdx
    ret
.Lprobe_read_fixup:
    mov eax, 1
    ret

/* u64 vm_probe_write(u64 addr, u64 value): 0 after [addr] = value, or 1 on a fault */
.global vm_probe_write
vm_probe_write:
    xor eax, eax
.Lprobe_write_insn:
    mov qword ptr [rdi], rsi
    ret
.Lprobe_write_fixup:
    mov eax, 1
    ret

/* u64 vm_probe_exec(u64 target): calls target (which must return), 0, or 1 on a
   fetch fault at target */
.global vm_probe_exec
vm_probe_exec:
    xor eax, eax
    call rdi
    ret
.global vm_probe_exec_fixup
vm_probe_exec_fixup:
    mov eax, 1
    ret

.pushsection .ex_table, "a"
.p2align 3
.quad .Lprobe_read_insn, .Lprobe_read_fixup
.quad .Lprobe_write_insn, .Lprobe_write_fixup
.popsection

/* u64 vm_run_on_stack(u64 top, u64 function, u64 *saved_rsp): runs function() with
   rsp = top; 0 when it returns, 1 when the page-fault handler ended it (it resumes at
   vm_run_on_stack_fixup with rsp = *saved_rsp) */
.global vm_run_on_stack
vm_run_on_stack:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov qword ptr [rdx], rsp
    mov r12, rdx
    mov rsp, rdi
    call rsi
    mov rsp, qword ptr [r12]
    xor eax, eax
    jmp .Lrun_on_stack_out
.global vm_run_on_stack_fixup
vm_run_on_stack_fixup:
    mov eax, 1
.Lrun_on_stack_out:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
.text
"#
);

unsafe extern "C" {
    fn vm_probe_read(addr: u64, out: *mut u64) -> u64;
    fn vm_probe_write(addr: u64, value: u64) -> u64;
    fn vm_probe_exec(target: u64) -> u64;
    static vm_probe_exec_fixup: u8;
    fn vm_run_on_stack(top: u64, function: u64, saved_rsp: *mut u64) -> u64;
    static vm_run_on_stack_fixup: u8;
    static __ex_table_start: ExTableEntry;
    static __ex_table_end: ExTableEntry;
}

#[repr(C)]
struct ExTableEntry {
    insn: u64,
    fixup: u64,
}

/// Per CPU, as probes run on every CPU at once.
struct ProbeState {
    /// The last fault a probe caught; written by the handler before it resumes the probe.
    fault_addr: AtomicU64,
    fault_code: AtomicU64,
    /// The target of the running `probe_exec`, or 0.
    exec_target: AtomicU64,
    /// The stack `run_on_stack` switched to: the unmapped range below it, or 0..0.
    stack_guard_start: AtomicU64,
    stack_guard_end: AtomicU64,
    /// Where `run_on_stack` left the caller's stack pointer.
    saved_rsp: AtomicU64,
}

static PROBES: [ProbeState; MAX_CPUS] = [const {
    ProbeState {
        fault_addr: AtomicU64::new(0),
        fault_code: AtomicU64::new(0),
        exec_target: AtomicU64::new(0),
        stack_guard_start: AtomicU64::new(0),
        stack_guard_end: AtomicU64::new(0),
        saved_rsp: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// The calling CPU's probe state.
fn probes() -> &'static ProbeState {
    &PROBES[cpu_index()]
}

fn last_fault() -> Fault {
    let probes = probes();
    Fault {
        addr: VirtAddr::new_truncate(probes.fault_addr.load(Ordering::SeqCst)),
        code: PageFaultErrorCode::from_bits_retain(probes.fault_code.load(Ordering::SeqCst)),
    }
}

/// Reads the `u64` at `addr`, or reports the page fault it raises.
///
/// # Safety
///
/// If `addr` is mapped, reading it must be harmless (not a device register with
/// read side effects). `addr` is canonical and 8-byte aligned (a non-canonical
/// address raises #GP, which is fatal).
pub unsafe fn probe_read(addr: VirtAddr) -> Result<u64, Fault> {
    let mut value = 0;
    // SAFETY: the probe reads `addr` (harmless by the caller's contract) and writes
    // our local; a page fault on the read is recovered through the exception table.
    match unsafe { vm_probe_read(addr.as_u64(), &mut value) } {
        0 => Ok(value),
        _ => Err(last_fault()),
    }
}

/// Writes `value` to `addr`, or reports the page fault it raises.
///
/// # Safety
///
/// If `addr` is mapped writable, the write must not corrupt anything in use.
/// `addr` is canonical and 8-byte aligned.
pub unsafe fn probe_write(addr: VirtAddr, value: u64) -> Result<(), Fault> {
    // SAFETY: the caller vouches for the write; a page fault is recovered.
    match unsafe { vm_probe_write(addr.as_u64(), value) } {
        0 => Ok(()),
        _ => Err(last_fault()),
    }
}

/// Calls the code at `addr`, or reports the page fault its instruction fetch raises.
///
/// # Safety
///
/// If `addr` is executable, it holds a function that follows the C calling
/// convention, takes no arguments and returns (a single `ret`, 0xc3, will do).
/// `addr` is canonical.
pub unsafe fn probe_exec(addr: VirtAddr) -> Result<(), Fault> {
    probes().exec_target.store(addr.as_u64(), Ordering::SeqCst);
    // SAFETY: the caller vouches for the code at `addr`; a fetch fault at `addr`
    // itself is recovered by `page_fault`.
    let faulted = unsafe { vm_probe_exec(addr.as_u64()) };
    probes().exec_target.store(0, Ordering::SeqCst);
    match faulted {
        0 => Ok(()),
        _ => Err(last_fault()),
    }
}

/// Runs `function` on the stack whose top is `top`, whose unmapped guard is `guard`
/// (below it): `Ok` when it returns, or the page fault that ran it into the guard (the
/// handler, on its IST stack, ends it and resumes here on the caller's stack).
///
/// # Safety
///
/// `top` is the top of a mapped, writable stack this CPU uses for nothing else, with
/// `guard` unmapped below it; `function` only uses that stack and returns or overflows.
pub unsafe fn run_on_stack(
    top: VirtAddr,
    guard: core::ops::Range<VirtAddr>,
    function: extern "C" fn(),
) -> Result<(), Fault> {
    let probes = probes();
    probes
        .stack_guard_start
        .store(guard.start.as_u64(), Ordering::SeqCst);
    probes
        .stack_guard_end
        .store(guard.end.as_u64(), Ordering::SeqCst);
    // SAFETY: the caller vouches for the stack and the function; a fault in the guard
    // resumes at the fixup with the saved stack pointer.
    let overflowed = unsafe {
        vm_run_on_stack(
            top.as_u64(),
            function as usize as u64,
            probes.saved_rsp.as_ptr(),
        )
    };
    probes.stack_guard_start.store(0, Ordering::SeqCst);
    probes.stack_guard_end.store(0, Ordering::SeqCst);
    match overflowed {
        0 => Ok(()),
        _ => Err(last_fault()),
    }
}

/// Whether a fault at `cr2` ran `run_on_stack`'s function into its guard.
fn is_stack_overflow(cr2: u64) -> bool {
    let probes = probes();
    (probes.stack_guard_start.load(Ordering::SeqCst)..probes.stack_guard_end.load(Ordering::SeqCst))
        .contains(&cr2)
}

fn fixup_for(rip: u64) -> Option<u64> {
    // SAFETY: the linker script brackets the `.ex_table` section, which holds only
    // `ExTableEntry` pairs emitted above, with these two symbols.
    let table = unsafe {
        let start = &raw const __ex_table_start;
        let end = &raw const __ex_table_end;
        core::slice::from_raw_parts(start, end.offset_from_unsigned(start))
    };
    table
        .iter()
        .find(|entry| entry.insn == rip)
        .map(|entry| entry.fixup)
}

/// Whether a fetch fault at `cr2` is `probe_exec`'s call of its target.
fn is_exec_probe_fault(frame: &TrapFrame, cr2: u64, code: PageFaultErrorCode) -> bool {
    code.contains(PageFaultErrorCode::INSTRUCTION_FETCH)
        && frame.rip == cr2
        && cr2 == probes().exec_target.load(Ordering::SeqCst)
}

/// The page-fault handler, called by the entry stub with the saved frame.
pub extern "C" fn page_fault(frame: &mut TrapFrame) {
    let cr2 = Cr2::read_raw();
    let code = PageFaultErrorCode::from_bits_retain(frame.error_code);
    let resume = if let Some(fixup) = fixup_for(frame.rip) {
        fixup
    } else if is_exec_probe_fault(frame, cr2, code) {
        frame.rsp += 8; // pop the probe's return address, as the target's `ret` would
        &raw const vm_probe_exec_fixup as u64
    } else if is_stack_overflow(cr2) {
        // Back to the caller's stack: the overflowed one is abandoned.
        frame.rsp = probes().saved_rsp.load(Ordering::SeqCst);
        &raw const vm_run_on_stack_fixup as u64
    } else {
        crate::println!(
            "\nfatal: page fault at {cr2:#x}, rip {:#x}, error code {code:?}",
            frame.rip
        );
        // The heap's word first (an overrun, underrun or use after free of a sampled
        // object), then the manager's; neither waits for a lock the faulting code
        // may hold.
        let addr = VirtAddr::new_truncate(cr2);
        if let Some(diagnosis) = crate::mm::HEAP.diagnose_fault(addr, code) {
            crate::println!("heap: {diagnosis}");
        }
        if let Some(vmalloc) = crate::mm::VMALLOC.get() {
            crate::println!("vmalloc: {}", vmalloc.diagnose_fault(addr, code));
        }
        crate::serial::exit(false)
    };
    probes().fault_addr.store(cr2, Ordering::SeqCst);
    probes().fault_code.store(code.bits(), Ordering::SeqCst);
    frame.rip = resume;
}
