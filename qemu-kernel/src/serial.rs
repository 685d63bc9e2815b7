//! Output on COM1, the test harness's line on COM2, and the isa-debug-exit device
//! that ends the QEMU run.

use core::fmt;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;
/// The harness's line: the kernel asks QEMU's own page walk about its mappings here
/// and waits for the answer (see `checks::oracle`).
const COM2: u16 = 0x2f8;
/// `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Written on success; QEMU then exits with status `(0x10 << 1) | 1 = 33`.
pub const EXIT_SUCCESS_VALUE: u32 = 0x10;
/// Written on failure; QEMU exits with status 35.
pub const EXIT_FAILURE_VALUE: u32 = 0x11;

/// Programs COM1 and COM2 for 115200 baud, 8N1, FIFOs on, no interrupts.
pub fn init() {
    init_port(COM1);
    init_port(COM2);
}

fn init_port(port: u16) {
    let setup: [(u16, u8); 7] = [
        (1, 0x00), // IER: no interrupts
        (3, 0x80), // LCR: DLAB on, to set the divisor
        (0, 0x01), // DLL: divisor 1 = 115200 baud
        (1, 0x00), // DLM
        (3, 0x03), // LCR: 8 bits, no parity, one stop bit
        (2, 0xc7), // FCR: FIFOs on and cleared
        (4, 0x0b), // MCR: DTR, RTS, OUT2
    ];
    for (offset, value) in setup {
        // SAFETY: the UART's registers; writing them only reconfigures it.
        unsafe { Port::<u8>::new(port + offset).write(value) };
    }
}

fn write_byte(byte: u8) {
    write_byte_to(COM1, byte);
}

fn write_byte_to(port: u16, byte: u8) {
    let mut line_status = Port::<u8>::new(port + 5);
    // SAFETY: reading the line status register has no side effect.
    while unsafe { line_status.read() } & 0x20 == 0 {
        core::hint::spin_loop();
    }
    // SAFETY: the transmit holding register is empty (LSR bit 5).
    unsafe { Port::<u8>::new(port).write(byte) };
}

/// COM2, the harness's line, as a `fmt::Write` sink.
pub struct Harness;

impl fmt::Write for Harness {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        text.bytes().for_each(|byte| write_byte_to(COM2, byte));
        Ok(())
    }
}

/// The next byte the harness sends on COM2, or `None` once `spins` polls of the
/// line status found none.
pub fn harness_byte(spins: u64) -> Option<u8> {
    let mut line_status = Port::<u8>::new(COM2 + 5);
    for _ in 0..spins {
        // SAFETY: reading the line status register has no side effect.
        if unsafe { line_status.read() } & 1 != 0 {
            // SAFETY: a byte waits in the receive buffer (LSR bit 0).
            return Some(unsafe { Port::<u8>::new(COM2).read() });
        }
        core::hint::spin_loop();
    }
    None
}

/// COM1 as a `fmt::Write` sink. Stateless and lock-free so that fault handlers and
/// the panic handler can print whatever the interrupted code was doing.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        text.bytes().for_each(write_byte);
        Ok(())
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

/// Prints to COM1, then a newline.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}

/// Ends the QEMU run with the success or failure status.
pub fn exit(success: bool) -> ! {
    let value = if success {
        EXIT_SUCCESS_VALUE
    } else {
        EXIT_FAILURE_VALUE
    };
    // SAFETY: isa-debug-exit terminates QEMU; without the device the write is ignored.
    unsafe { Port::<u32>::new(DEBUG_EXIT_PORT).write(value) };
    // Without the device, stop here rather than run on.
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
