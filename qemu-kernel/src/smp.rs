//! The other CPUs: starting them, knowing which CPU runs, the library's shootdown
//! wired to the local APIC, and running work on every CPU at once.
//!
//! # Starting an application processor (AP)
//!
//! An AP waits, after reset, for an INIT and a STARTUP IPI; the STARTUP IPI starts it
//! in real mode at a page below 1 MiB. [`start_aps`] copies the trampoline of
//! [`crate::boot`] to [`TRAMPOLINE`], and for each AP in turn writes the kernel's CR3,
//! the AP's stack top and its index where the trampoline reads them, sends INIT and
//! STARTUP (a second STARTUP if the first went unanswered), and waits until the AP
//! says it started before it starts the next: the variables are shared.
//!
//! The AP switches to long mode on the kernel's page tables and enters [`ap_main`],
//! which sets it up in the order the shootdown needs: GDT, TSS and IDT (so the
//! shootdown vector has a handler), its index in GS base, its APIC enabled; then it
//! joins the online set and flushes its own TLB, so whatever it cached before a
//! shootdown could reach it is gone; then it enables interrupts and waits for work.
//!
//! QEMU numbers the APIC IDs of `-smp N` from 0, so CPU `i` is started at APIC ID `i`;
//! each AP records the ID it finds, and [`KernelCpus::send_ipi`] uses those.

use crate::cell::{PageAligned, StaticCell};
use crate::interrupts::{self, SHOOTDOWN_VECTOR, WAKE_VECTOR};
use crate::lapic;
use core::ops::Range;
use core::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use vmalloc::smp::{CpuSet, Cpus, Shootdown};
use vmalloc::tlb::InvlpgFlush;
use x86_64::VirtAddr;
use x86_64::instructions::port::Port;
use x86_64::instructions::{interrupts as irq, tlb};
use x86_64::registers::control::Cr3;
use x86_64::registers::model_specific::GsBase;

/// The most CPUs this kernel starts.
pub const MAX_CPUS: usize = 8;
/// Physical (= identity-mapped virtual) address the trampoline is copied to: a page
/// below 1 MiB that the memory map keeps from the frame allocator.
pub const TRAMPOLINE: u64 = 0x8000;
const AP_STACK_SIZE: usize = 128 * 1024;
/// Spins to wait for an AP after a STARTUP IPI before sending the second one, and
/// after the second before giving up (TCG starts an AP in well under a million).
const START_SPINS: u32 = 50_000_000;

static AP_STACKS: StaticCell<PageAligned<[[u8; AP_STACK_SIZE]; MAX_CPUS]>> =
    StaticCell::new(PageAligned([[0; AP_STACK_SIZE]; MAX_CPUS]));

/// Read by the trampoline: the PML4 to load (below 4 GiB).
#[unsafe(no_mangle)]
static AP_BOOT_CR3: AtomicU64 = AtomicU64::new(0);
/// Read by the trampoline: the starting AP's stack top (below 4 GiB).
#[unsafe(no_mangle)]
static AP_BOOT_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// Read by the trampoline: the starting AP's index, `ap_main`'s argument.
#[unsafe(no_mangle)]
static AP_BOOT_INDEX: AtomicU64 = AtomicU64::new(0);
/// Index of the last AP that finished starting.
static STARTED: AtomicUsize = AtomicUsize::new(0);

/// CPUs that run on the kernel's page tables with the shootdown vector installed.
static ONLINE: AtomicU64 = AtomicU64::new(1);
/// APIC ID of each CPU, as it read its own.
static APIC_IDS: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// The index of the CPU running the caller (GS base holds it).
pub fn cpu_index() -> usize {
    GsBase::read().as_u64() as usize
}

/// The online CPUs.
pub fn online() -> CpuSet {
    CpuSet::from_bits(ONLINE.load(Ordering::Acquire))
}

/// APIC ID of CPU `cpu`.
pub fn apic_id(cpu: usize) -> u8 {
    APIC_IDS[cpu].load(Ordering::Acquire)
}

/// This kernel's answers to the shootdown's questions.
pub struct KernelCpus;

// SAFETY: `current` is GS base, which each CPU sets to its own index (below MAX_CPUS)
// before anything calls the library on it, and threads never migrate; a CPU enters
// `ONLINE` only after its IDT and APIC can take the shootdown vector, flushes its TLB
// after entering, and never leaves; `send_ipi` sends the vector whose handler calls
// `TLB.handle_ipi()` to each target's own APIC ID.
unsafe impl Cpus for KernelCpus {
    fn current(&self) -> usize {
        cpu_index()
    }

    fn online(&self) -> CpuSet {
        online()
    }

    fn send_ipi(&self, targets: CpuSet) {
        for cpu in targets.iter().filter(|&cpu| cpu < MAX_CPUS) {
            lapic::send_ipi(apic_id(cpu), SHOOTDOWN_VECTOR);
        }
    }
}

/// The vmalloc manager's TLB flush: every online CPU's.
// SAFETY: `InvlpgFlush` runs only on CPUs in ring 0 with paging on.
pub static TLB: Shootdown<KernelCpus, InvlpgFlush> =
    Shootdown::new(KernelCpus, unsafe { InvlpgFlush::new() });

/// Sets up the bootstrap CPU as CPU 0, after the physical map exists (the APIC is
/// reached through it): masks the legacy PICs (their timer would arrive on an
/// exception vector), enables the APIC and records its ID.
pub fn init_bsp() {
    GsBase::write(VirtAddr::zero());
    for port in [0x21, 0xa1] {
        // SAFETY: the PICs' interrupt mask registers; masking every line only stops
        // legacy interrupts, which this kernel does not use.
        unsafe { Port::<u8>::new(port).write(0xff) };
    }
    lapic::enable();
    APIC_IDS[0].store(lapic::id(), Ordering::Release);
}

/// Starts CPUs `1..count` and returns how many CPUs are online. `in_use` are physical
/// ranges that must survive (the multiboot structures): the trampoline page must not
/// overlap them.
pub fn start_aps(count: usize, in_use: &[Range<u64>]) -> Result<usize, &'static str> {
    if count > MAX_CPUS {
        return Err("more CPUs asked for than MAX_CPUS");
    }
    let (start, end) = (&raw const ap_trampoline_start, &raw const ap_trampoline_end);
    let len = end as usize - start as usize;
    let page = TRAMPOLINE..TRAMPOLINE + 4096;
    if len > 4096
        || in_use
            .iter()
            .any(|r| r.start < page.end && page.start < r.end)
    {
        return Err("the trampoline page is in use");
    }
    // SAFETY: the trampoline's bytes in the kernel image, copied to an identity-mapped
    // page below 1 MiB that the memory map reserves and nothing uses (checked above).
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len) };
    AP_BOOT_CR3.store(Cr3::read().0.start_address().as_u64(), Ordering::Release);
    for cpu in 1..count {
        start_ap(cpu)?;
    }
    Ok(online().len())
}

fn start_ap(cpu: usize) -> Result<(), &'static str> {
    let stacks = AP_STACKS.get().cast::<[u8; AP_STACK_SIZE]>();
    // SAFETY: `cpu < MAX_CPUS`; only the address of its stack is computed.
    let top = unsafe { stacks.add(cpu + 1) } as u64;
    AP_BOOT_STACK_TOP.store(top, Ordering::Release);
    AP_BOOT_INDEX.store(cpu as u64, Ordering::Release);
    let apic_id = cpu as u8;
    lapic::send_init(apic_id);
    for _ in 0..2 {
        lapic::send_startup(apic_id, (TRAMPOLINE >> 12) as u8);
        for _ in 0..START_SPINS {
            if STARTED.load(Ordering::Acquire) == cpu {
                return Ok(());
            }
            core::hint::spin_loop();
        }
    }
    Err("an application processor did not start")
}

/// Where the trampoline lands, in long mode on the AP's own stack.
#[unsafe(no_mangle)]
extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    interrupts::init_cpu(cpu);
    GsBase::write(VirtAddr::new(cpu as u64));
    lapic::enable();
    APIC_IDS[cpu].store(lapic::id(), Ordering::Release);
    ONLINE.fetch_or(1 << cpu, Ordering::SeqCst);
    tlb::flush_all();
    STARTED.store(cpu, Ordering::Release);
    wait_for_work(cpu)
}

/// Work posted by [`on_each_cpu`]: a closure whose lifetime it guarantees.
struct Work(*const (dyn Fn(usize) + Sync));

// SAFETY: the closure is `Sync`; the pointer is only dereferenced while
// `on_each_cpu` keeps it alive.
unsafe impl Send for Work {}

static WORK: spin::Mutex<Option<Work>> = spin::Mutex::new(None);
/// Bumped for each piece of work posted.
static WORK_POSTED: AtomicU64 = AtomicU64::new(0);
/// CPUs that finished the current piece.
static WORK_DONE: AtomicUsize = AtomicUsize::new(0);

fn wait_for_work(cpu: usize) -> ! {
    let mut seen = 0;
    loop {
        // Interrupts off from the check to the `hlt`: a wake-up IPI sent in between
        // stays pending and ends the `hlt` (`sti` takes effect after it starts).
        irq::disable();
        let posted = WORK_POSTED.load(Ordering::Acquire);
        if posted == seen {
            irq::enable_and_hlt();
            continue;
        }
        seen = posted;
        let work = WORK.lock().as_ref().map(|work| work.0);
        irq::enable();
        if let Some(work) = work {
            // SAFETY: `on_each_cpu` keeps the closure alive until every online AP has
            // counted itself done below.
            unsafe { (*work)(cpu) };
        }
        WORK_DONE.fetch_add(1, Ordering::AcqRel);
    }
}

/// Runs `work(cpu)` on every online CPU at once, this one (CPU 0) included, and
/// returns when all have finished. Linux's `on_each_cpu`. CPU 0 only.
pub fn on_each_cpu(work: &(dyn Fn(usize) + Sync)) {
    assert_eq!(cpu_index(), 0, "on_each_cpu runs on CPU 0");
    let others = online().without(0);
    // SAFETY: only the lifetime is erased; the closure is borrowed until this function
    // returns, and it returns only after every AP that can see it has finished with it.
    let erased: *const (dyn Fn(usize) + Sync + 'static) =
        unsafe { core::mem::transmute(work as *const (dyn Fn(usize) + Sync)) };
    *WORK.lock() = Some(Work(erased));
    WORK_DONE.store(0, Ordering::Release);
    WORK_POSTED.fetch_add(1, Ordering::AcqRel);
    for cpu in others.iter() {
        lapic::send_ipi(apic_id(cpu), WAKE_VECTOR);
    }
    work(0);
    while WORK_DONE.load(Ordering::Acquire) < others.len() {
        core::hint::spin_loop();
    }
    *WORK.lock() = None;
}
