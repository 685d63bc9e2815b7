//! The local APIC (xAPIC mode, through the physical map): enabling it, end of
//! interrupt, and sending IPIs, including the INIT and STARTUP IPIs that start an
//! application processor.
//!
//! Every CPU's APIC answers at the same physical address, so each CPU talks to its
//! own. An IPI is one write of the high half of the interrupt command register (the
//! destination) and one of the low half (which sends it): [`send`] keeps interrupts off
//! in between, so a handler on the same CPU that sends too cannot mix the halves.

use crate::paging::PHYS_OFFSET;
use x86_64::instructions::interrupts;
use x86_64::registers::model_specific::Msr;

const IA32_APIC_BASE: u32 = 0x1b;
const ID: u64 = 0x20;
const TASK_PRIORITY: u64 = 0x80;
const END_OF_INTERRUPT: u64 = 0xb0;
const SPURIOUS: u64 = 0xf0;
const COMMAND_LOW: u64 = 0x300;
const COMMAND_HIGH: u64 = 0x310;
const TIMER_LVT: u64 = 0x320;
const TIMER_INITIAL_COUNT: u64 = 0x380;
const TIMER_DIVIDE: u64 = 0x3e0;
/// Local vector table entry: the interrupt is masked.
const LVT_MASKED: u32 = 1 << 16;
/// Timer entry: periodic (reloads the initial count) rather than one-shot.
const TIMER_PERIODIC: u32 = 1 << 17;
/// Divide configuration: the timer counts at the bus clock itself.
const DIVIDE_BY_1: u32 = 0b1011;
/// Spurious-vector register: APIC software enable.
const SOFTWARE_ENABLE: u32 = 1 << 8;
/// Command register: the previous IPI is still being delivered.
const DELIVERY_PENDING: u32 = 1 << 12;
const LEVEL_ASSERT: u32 = 1 << 14;
const MODE_INIT: u32 = 0b101 << 8;
const MODE_STARTUP: u32 = 0b110 << 8;

/// Vector of the spurious interrupt the APIC may raise; its handler sends no EOI.
pub const SPURIOUS_VECTOR: u8 = 0xff;

fn register(offset: u64) -> *mut u32 {
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU; reading it has no effect.
    let base = unsafe { Msr::new(IA32_APIC_BASE).read() } & 0x000f_ffff_ffff_f000;
    (PHYS_OFFSET + base + offset) as *mut u32
}

fn read(offset: u64) -> u32 {
    // SAFETY: an APIC register, mapped uncached by the physical map; the registers
    // read here (ID, command) have no read side effects.
    unsafe { register(offset).read_volatile() }
}

fn write(offset: u64, value: u32) {
    // SAFETY: an APIC register, mapped uncached by the physical map; callers write
    // only the values this module documents.
    unsafe { register(offset).write_volatile(value) }
}

/// Software-enables this CPU's APIC with [`SPURIOUS_VECTOR`] and lets every
/// interrupt priority through.
pub fn enable() {
    write(SPURIOUS, SOFTWARE_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(TASK_PRIORITY, 0);
}

/// This CPU's APIC ID.
pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

/// Signals the end of the interrupt being handled.
pub fn end_of_interrupt() {
    write(END_OF_INTERRUPT, 0);
}

/// Starts this CPU's APIC timer: an interrupt with `vector` every `period` bus
/// clocks (QEMU's APIC bus runs at 1 GHz: nanoseconds of host time).
pub fn start_periodic_timer(vector: u8, period: u32) {
    write(TIMER_DIVIDE, DIVIDE_BY_1);
    write(TIMER_LVT, TIMER_PERIODIC | u32::from(vector));
    write(TIMER_INITIAL_COUNT, period);
}

/// Stops this CPU's APIC timer (an interrupt already pending is still delivered).
pub fn stop_timer() {
    write(TIMER_LVT, LVT_MASKED);
    write(TIMER_INITIAL_COUNT, 0);
}

/// Sends `command` (the low half of the command register) to the CPU with APIC ID
/// `apic_id`, and waits until the APIC has delivered it.
fn send(apic_id: u8, command: u32) {
    interrupts::without_interrupts(|| {
        write(COMMAND_HIGH, u32::from(apic_id) << 24);
        write(COMMAND_LOW, command);
        while read(COMMAND_LOW) & DELIVERY_PENDING != 0 {
            core::hint::spin_loop();
        }
    });
}

/// Sends a fixed interrupt with `vector` to the CPU with APIC ID `apic_id`.
pub fn send_ipi(apic_id: u8, vector: u8) {
    send(apic_id, LEVEL_ASSERT | u32::from(vector));
}

/// Sends INIT: the target resets and waits for a STARTUP IPI.
pub fn send_init(apic_id: u8) {
    send(apic_id, LEVEL_ASSERT | MODE_INIT);
}

/// Sends STARTUP: a target waiting after INIT starts in real mode at
/// `page * 4096` (CS = `page << 8`, IP = 0).
pub fn send_startup(apic_id: u8, page: u8) {
    send(apic_id, LEVEL_ASSERT | MODE_STARTUP | u32::from(page));
}
