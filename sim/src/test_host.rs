//! The host window: pages mapped in the machine's tables, used through host pointers.

use super::*;
use core::ffi::c_void;
use std::vec;
use vmalloc::TlbFlush;
use vmalloc::frame::MapperFrames;
use x86_64::structures::paging::Page;
use x86_64::structures::paging::mapper::{Mapper, OffsetPageTable};
use x86_64::structures::paging::{FrameAllocator, PageTableFlags as Flags, Size2MiB};

mod fills;
mod handler;
mod parked;

const WINDOW: u64 = 4 << 20;
const RW: Flags = Flags::PRESENT.union(Flags::WRITABLE);

fn machine() -> SimMachine {
    SimMachine::new(
        SimConfig::new(64 << 20)
            .with_holes(4)
            .with_host_window(WINDOW),
    )
}

/// The machine's own frames, as the `x86_64` crate's mapper takes them.
fn frames_of(machine: &SimMachine) -> MapperFrames<SimFrames> {
    MapperFrames(machine.frames())
}

/// The next frame, which the test then owns.
fn next(frames: &mut MapperFrames<SimFrames>) -> PhysFrame {
    frames.allocate_frame().expect("test ran out of frames")
}

/// The machine's tables, as the `x86_64` crate's mapper sees them.
fn mapper(machine: &SimMachine) -> OffsetPageTable<'_> {
    // SAFETY: each test holds one mapper at a time and writes tables only through it.
    unsafe { machine.offset_page_table() }
}

/// The window's page `index`.
fn window_page(machine: &SimMachine, index: u64) -> Page {
    let (start, size) = machine.host_window().expect("a host window");
    assert!(index * 4096 < size);
    Page::containing_address(start + index * 4096)
}

fn map(
    machine: &SimMachine,
    frames: &mut MapperFrames<SimFrames>,
    page: Page,
    frame: PhysFrame,
    flags: Flags,
) {
    // SAFETY: the frame is a usable frame of the machine; nothing else uses the page.
    // Tables are made writable, so the leaf alone decides.
    unsafe { mapper(machine).map_to_with_table_flags(page, frame, flags, RW, frames) }
        .expect("page is free")
        .ignore();
}

fn ptr(page: Page) -> *mut u8 {
    page.start_address().as_mut_ptr()
}

/// Whether the host has a resident page mapped at `page` (a window page the handler
/// filled and no flush took away: reserved pages are never resident, and a parked
/// page, whose frame stays mapped without access, does not count).
fn host_resident(page: Page) -> bool {
    let mut status = [0u8; 1];
    // SAFETY: the page is inside the window, a mapping this process owns; `mincore`
    // only reports on it.
    let rc = unsafe { libc::mincore(ptr(page).cast::<c_void>(), 4096, status.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    status[0] & 1 == 1 && host_rights(page).starts_with('r')
}

/// The rights `/proc/self/maps` gives the host mapping holding `page`, as it
/// prints them (`rw-s`: a filled page of the memfd; `---s`: a parked one; `---p`:
/// reserved).
fn host_rights(page: Page) -> std::string::String {
    let addr = page.start_address().as_u64();
    let maps = std::fs::read_to_string("/proc/self/maps").expect("procfs");
    maps.lines()
        .find_map(|line| {
            let mut fields = line.split(' ');
            let (start, end) = fields.next()?.split_once('-')?;
            let range = u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?;
            range
                .contains(&addr)
                .then(|| fields.next().unwrap_or("").into())
        })
        .expect("a mapping holds the page")
}

#[test]
fn machine_without_window_has_none() {
    let machine = SimMachine::new(SimConfig::new(32 << 20));
    assert_eq!(machine.host_window(), None);
}

#[test]
fn window_is_aligned_canonical_and_reserved() {
    let machine = machine();
    let (start, size) = machine.host_window().unwrap();
    assert_eq!(size, WINDOW);
    assert!(start.is_aligned(2u64 << 20));
    assert!(start.as_u64() + size < 1 << 47, "lower half");
    assert!(!host_resident(window_page(&machine, 0)));
}

#[test]
fn host_accesses_reach_scattered_frames() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    // Every third frame, last first: no two pages map neighbouring frames.
    let data: Vec<PhysFrame> = (0..24)
        .map(|_| next(&mut frames))
        .step_by(3)
        .rev()
        .collect();
    for (index, frame) in data.iter().enumerate() {
        map(
            &machine,
            &mut frames,
            window_page(&machine, index as u64 * 5),
            *frame,
            RW,
        );
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, 0x40 + index as u8) };
    }
    for (index, frame) in data.iter().enumerate() {
        let page = ptr(window_page(&machine, index as u64 * 5));
        // SAFETY: the page is mapped writable in the machine's tables, so the
        // handler maps its frame on the first touch.
        let before = unsafe { page.add(100).read_volatile() };
        assert_eq!(before, 0x40 + index as u8, "host sees the frame's bytes");
        // SAFETY: as above.
        unsafe { page.add(17).write_volatile(index as u8) };
        let mut byte = [0];
        machine.read_phys(frame.start_address() + 17, &mut byte);
        assert_eq!(byte[0], index as u8, "the write landed in frame {frame:?}");
    }
    // Unmapped pages between them stay unmapped in the host.
    assert!(!host_resident(window_page(&machine, 1)));
}

#[test]
fn aliased_pages_see_each_others_writes() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let frame = next(&mut frames);
    let (first, second) = (window_page(&machine, 3), window_page(&machine, 700));
    map(&machine, &mut frames, first, frame, RW);
    map(&machine, &mut frames, second, frame, RW);
    // SAFETY: both pages are mapped writable to the same frame.
    unsafe {
        ptr(first).add(8).write_volatile(0xa1);
        assert_eq!(ptr(second).add(8).read_volatile(), 0xa1);
        ptr(second).add(9).write_volatile(0xb2);
        assert_eq!(ptr(first).add(9).read_volatile(), 0xb2);
    }
    assert_eq!(machine.frame_bytes(frame)[8..10], [0xa1, 0xb2]);
}

#[test]
fn rust_values_live_in_the_window() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    for index in 0..4 {
        let frame = next(&mut frames);
        map(
            &machine,
            &mut frames,
            window_page(&machine, index),
            frame,
            RW,
        );
    }
    let words = ptr(window_page(&machine, 0)).cast::<u64>();
    let count = 4 * 4096 / 8;
    // SAFETY: four contiguous writable pages, 8-aligned, zeroed frames; no other
    // reference to them.
    let slice = unsafe { core::slice::from_raw_parts_mut(words, count) };
    for (i, word) in slice.iter_mut().enumerate() {
        *word = i as u64 * 3;
    }
    assert_eq!(
        slice.iter().sum::<u64>(),
        3 * (count as u64 - 1) * count as u64 / 2
    );
}

#[test]
fn flush_drops_the_host_mapping() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 42);
    let frame = next(&mut frames);
    map(&machine, &mut frames, page, frame, RW);
    // SAFETY: the page is mapped writable.
    unsafe { ptr(page).write_volatile(7) };
    assert!(host_resident(page));

    mapper(&machine).unmap(page).unwrap().1.ignore();
    machine.flush_page(page);
    assert!(!host_resident(page), "flush_page dropped the host mapping");
    let fault = machine.translate(page.start_address(), Access::READ);
    assert!(fault.unwrap_err().page_fault().is_some());
    assert_eq!(machine.frame_bytes(frame)[0], 7, "the frame keeps its data");
}

#[test]
fn flush_range_and_flush_all_drop_the_changed_pages_they_cover() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let pages: Vec<Page> = (10..14).map(|i| window_page(&machine, i)).collect();
    for &page in &pages {
        let frame = next(&mut frames);
        map(&machine, &mut frames, page, frame, RW);
        // SAFETY: mapped writable.
        unsafe { ptr(page).write_volatile(1) };
    }
    // Every entry changes: each page now maps a fresh frame holding 2.
    for &page in &pages {
        mapper(&machine).unmap(page).unwrap().1.ignore();
        let frame = next(&mut frames);
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, 2) };
        map(&machine, &mut frames, page, frame, RW);
    }
    machine.flush_range(Page::range(pages[1], pages[3]));
    let resident: Vec<bool> = pages.iter().map(|&p| host_resident(p)).collect();
    assert_eq!(resident, [true, false, false, true]);

    // SAFETY: mapped writable. Outside the flushed range the host mapping is stale,
    // as a TLB entry would be; inside it, the next touch fills the new frame (and
    // page 2 with it, up to page 3, which the window holds).
    let seen = unsafe { [ptr(pages[0]).read_volatile(), ptr(pages[1]).read_volatile()] };
    assert_eq!(seen, [1, 2]);
    let resident: Vec<bool> = pages.iter().map(|&p| host_resident(p)).collect();
    assert_eq!(resident, [true, true, true, true]);

    // Pages 1 and 2 were filled from the tables as they are now: the full flush
    // keeps them.
    machine.flush_all();
    let resident: Vec<bool> = pages.iter().map(|&p| host_resident(p)).collect();
    assert_eq!(resident, [false, true, true, false]);
    // SAFETY: mapped writable.
    let seen = unsafe { [ptr(pages[2]).read_volatile(), ptr(pages[3]).read_volatile()] };
    assert_eq!(seen, [2, 2]);
}

#[test]
fn a_flush_keeps_pages_whose_translation_did_not_change() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let pages: Vec<Page> = (20..28).map(|i| window_page(&machine, i)).collect();
    for &page in &pages {
        let frame = next(&mut frames);
        map(&machine, &mut frames, page, frame, RW);
        // SAFETY: mapped writable.
        unsafe { ptr(page).write_volatile(3) };
    }
    let misses = machine.tlb_stats().misses;
    machine.flush_all();
    machine.flush_range(Page::range(pages[0], pages[7]));
    machine.flush_page(pages[7]);
    assert!(pages.iter().all(|&p| host_resident(p)));
    for &page in &pages {
        // SAFETY: mapped writable.
        assert_eq!(unsafe { ptr(page).read_volatile() }, 3);
    }
    assert_eq!(
        machine.tlb_stats().misses,
        misses,
        "no page was filled again"
    );

    // A change of rights alone is a change: the page is dropped and filled again
    // read-only.
    // SAFETY: the page is mapped; only its flags change.
    unsafe { mapper(&machine).update_flags(pages[2], Flags::PRESENT) }
        .unwrap()
        .ignore();
    machine.flush_all();
    assert!(!host_resident(pages[2]));
    assert!(host_resident(pages[3]));
    // SAFETY: mapped readable.
    assert_eq!(unsafe { ptr(pages[2]).read_volatile() }, 3);
    assert_eq!(machine.tlb_stats().misses, misses + 1);
}

#[test]
fn unmap_without_flush_leaves_the_old_frame_readable() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 5);
    let frame = next(&mut frames);
    map(&machine, &mut frames, page, frame, RW);
    // SAFETY: mapped writable.
    unsafe { ptr(page).write_volatile(0x5a) };

    mapper(&machine).unmap(page).unwrap().1.ignore();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(frame.start_address() + 1, &[0x6b]) };
    // SAFETY: the host mapping is stale, as a TLB entry would be: still the frame.
    let stale = unsafe { [ptr(page).read_volatile(), ptr(page).add(1).read_volatile()] };
    assert_eq!(stale, [0x5a, 0x6b]);
    assert!(
        machine
            .translate(page.start_address(), Access::READ)
            .is_err()
    );
}

#[test]
fn read_only_page_becomes_writable_after_a_rewalk() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 9);
    let frame = next(&mut frames);
    map(&machine, &mut frames, page, frame, Flags::PRESENT);
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(frame.start_address(), &[3]) };
    // SAFETY: mapped readable.
    assert_eq!(unsafe { ptr(page).read_volatile() }, 3);
    // Upgrading permissions needs no flush on x86: the write faults, and the fault
    // re-walks the tables.
    // SAFETY: the page is mapped; only its flags change.
    unsafe { mapper(&machine).update_flags(page, RW) }
        .unwrap()
        .ignore();
    // SAFETY: now mapped writable.
    unsafe { ptr(page).write_volatile(4) };
    assert_eq!(machine.frame_bytes(frame)[0], 4);
}

#[test]
fn host_fills_count_as_tlb_misses() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let page = window_page(&machine, 0);
    let frame = next(&mut frames);
    map(&machine, &mut frames, page, frame, RW);
    let before = machine.tlb_stats().misses;
    // SAFETY: mapped writable.
    unsafe {
        ptr(page).write_volatile(1);
        ptr(page).add(1).write_volatile(2);
    }
    assert_eq!(
        machine.tlb_stats().misses,
        before + 1,
        "one fill, then hits"
    );
}

#[test]
fn threads_fill_their_own_pages_at_once() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    const THREADS: u64 = 4;
    const PAGES: u64 = 32;
    let mut mapped = vec![];
    for index in 0..THREADS * PAGES {
        let (page, frame) = (window_page(&machine, index), next(&mut frames));
        map(&machine, &mut frames, page, frame, RW);
        mapped.push((page.start_address().as_u64(), frame));
    }
    std::thread::scope(|scope| {
        for chunk in mapped.chunks(PAGES as usize) {
            scope.spawn(move || {
                for &(addr, _) in chunk {
                    let page = addr as *mut u64;
                    // SAFETY: each thread owns its pages, all mapped writable.
                    unsafe { page.add(1).write_volatile(addr) };
                }
            });
        }
        // Meanwhile the main thread flushes pages nobody uses.
        for _ in 0..50 {
            machine.flush_range(Page::range(
                window_page(&machine, THREADS * PAGES),
                window_page(&machine, THREADS * PAGES + 8),
            ));
        }
    });
    for (addr, frame) in mapped {
        let mut word = [0; 8];
        machine.read_phys(frame.start_address() + 8, &mut word);
        assert_eq!(u64::from_ne_bytes(word), addr);
    }
}

#[test]
fn two_machines_have_separate_windows() {
    let (one, two) = (machine(), machine());
    let (start_one, _) = one.host_window().unwrap();
    let (start_two, _) = two.host_window().unwrap();
    assert!(start_one.as_u64().abs_diff(start_two.as_u64()) >= WINDOW);
    for (machine, byte) in [(&one, 0x11), (&two, 0x22)] {
        let mut frames = frames_of(machine);
        let frame = next(&mut frames);
        map(machine, &mut frames, window_page(machine, 1), frame, RW);
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, byte) };
    }
    // SAFETY: page 1 of each window is mapped.
    let seen = unsafe {
        [
            ptr(window_page(&one, 1)).read_volatile(),
            ptr(window_page(&two, 1)).read_volatile(),
        ]
    };
    assert_eq!(seen, [0x11, 0x22]);
}

/// Runs `access` in a forked child with stderr piped back; returns how the child
/// ended and what it printed.
fn in_child(access: impl FnOnce()) -> (libc::c_int, std::string::String) {
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child only touches memory, runs the signal handler (which
    // allocates nothing) and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: async-signal-safe calls on descriptors the child owns.
        unsafe { libc::dup2(pipe[1], libc::STDERR_FILENO) };
        access();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closing our copy of the write end, so the read sees end of file.
    unsafe { libc::close(pipe[1]) };
    let mut printed = vec![0u8; 512];
    // SAFETY: reading into a buffer of that length.
    let len = unsafe { libc::read(pipe[0], printed.as_mut_ptr().cast(), printed.len()) };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    // SAFETY: the read end is ours.
    unsafe { libc::close(pipe[0]) };
    printed.truncate(len.max(0) as usize);
    (
        status,
        std::string::String::from_utf8_lossy(&printed).into_owned(),
    )
}

#[test]
fn forbidden_accesses_kill_with_sigsegv_and_say_where() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    let read_only = window_page(&machine, 2);
    let frame = next(&mut frames);
    map(&machine, &mut frames, read_only, frame, Flags::PRESENT);
    let unmapped = window_page(&machine, 3);
    for (page, write) in [(read_only, true), (unmapped, false)] {
        let (status, printed) = in_child(|| {
            // SAFETY: none; the child is meant to die here.
            unsafe {
                if write {
                    ptr(page).write_volatile(1);
                } else {
                    ptr(page).read_volatile();
                }
            }
        });
        assert!(
            libc::WIFSIGNALED(status),
            "child ended with status {status:#x}"
        );
        assert_eq!(libc::WTERMSIG(status), libc::SIGSEGV);
        let addr = std::format!("{:016x}", page.start_address().as_u64());
        assert!(printed.contains(&addr), "{printed:?} names {addr}");
    }
    assert_eq!(
        machine.frame_bytes(frame)[0],
        0,
        "the refused write changed nothing"
    );
}

/// A `linked_list_allocator` heap over window pages, as an `allocator_api2` allocator.
struct WindowHeap(spin::Mutex<linked_list_allocator::Heap>);

// SAFETY: blocks come from the heap, which hands each out once until deallocated.
unsafe impl allocator_api2::alloc::Allocator for WindowHeap {
    fn allocate(
        &self,
        layout: std::alloc::Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        let block = self.0.lock().allocate_first_fit(layout);
        let block = block.map_err(|()| allocator_api2::alloc::AllocError)?;
        Ok(NonNull::slice_from_raw_parts(block, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: std::alloc::Layout) {
        // SAFETY: the caller passes a block this heap allocated with `layout`.
        unsafe { self.0.lock().deallocate(ptr, layout) };
    }
}

#[test]
fn a_linked_list_heap_runs_in_the_window() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    const PAGES: u64 = 16;
    let mut data_frames = vec![];
    for index in 0..PAGES {
        // Every other frame: the heap is virtually contiguous, physically scattered.
        next(&mut frames);
        let frame = next(&mut frames);
        map(
            &machine,
            &mut frames,
            window_page(&machine, index),
            frame,
            RW,
        );
        data_frames.push(frame);
    }
    let bottom = ptr(window_page(&machine, 0));
    // SAFETY: `PAGES` contiguous writable window pages, used by nothing else.
    let heap = unsafe { linked_list_allocator::Heap::new(bottom, (PAGES * 4096) as usize) };
    let heap = WindowHeap(spin::Mutex::new(heap));

    let mut numbers = allocator_api2::vec::Vec::new_in(&heap);
    numbers.extend(0..5000u32);
    let boxed = allocator_api2::boxed::Box::new_in(0xfeed_u64, &heap);
    assert_eq!(
        numbers.iter().map(|&n| u64::from(n)).sum::<u64>(),
        4999 * 5000 / 2
    );
    assert_eq!(*boxed, 0xfeed);

    // The vector's bytes are in the frames behind its window pages.
    let at = numbers.as_ptr() as u64 + 4 * 1234;
    let index = (at - bottom as u64) / 4096;
    let mut bytes = [0; 4];
    machine.read_phys(
        data_frames[index as usize].start_address() + (at & 0xfff),
        &mut bytes,
    );
    assert_eq!(u32::from_ne_bytes(bytes), 1234);
    drop(numbers);
    drop(boxed);
    assert_eq!(heap.0.lock().used(), 0);
}

/// A system call meets a window page that is not host-mapped with `EFAULT`;
/// `host_window_prefault` maps the pages first, for reads and writes alike, and
/// names the first page the tables do not map.
#[test]
fn a_system_call_reaches_window_pages_once_they_are_prefaulted() {
    let machine = machine();
    let mut frames = frames_of(&machine);
    for index in 0..2 {
        let frame = next(&mut frames);
        map(
            &machine,
            &mut frames,
            window_page(&machine, index),
            frame,
            RW,
        );
        // SAFETY: bytes the test owns: no live Rust value lives there.
        unsafe { machine.fill_phys(frame.start_address(), 4096, 0x61 + index as u8) };
    }
    let buffer = ptr(window_page(&machine, 0));
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the range is the process's (the window's); the kernel only reads it.
    let sent = unsafe { libc::write(pipe[1], buffer.cast::<c_void>(), 8192) };
    let error = std::io::Error::last_os_error().raw_os_error();
    assert_eq!(
        (sent, error),
        (-1, Some(libc::EFAULT)),
        "not host-mapped yet"
    );
    let start = window_page(&machine, 0).start_address();
    assert_eq!(machine.host_window_prefault(start, 8192), Ok(()));
    // SAFETY: as above.
    let sent = unsafe { libc::write(pipe[1], buffer.cast::<c_void>(), 8192) };
    assert_eq!(sent, 8192);
    let mut back = vec![0u8; 8192];
    // SAFETY: `back` has room for what is read.
    let got = unsafe { libc::read(pipe[0], back.as_mut_ptr().cast(), 8192) };
    assert_eq!(got, 8192);
    assert!(back[..4096].iter().all(|&b| b == 0x61) && back[4096..].iter().all(|&b| b == 0x62));
    // The kernel writes into the pages, as a `read` into a buffer does.
    // SAFETY: `back` holds 8192 bytes.
    let sent = unsafe { libc::write(pipe[1], back.as_ptr().cast(), 100) };
    assert_eq!(sent, 100);
    // SAFETY: the window's pages, mapped writable; no Rust value lives there.
    let got = unsafe { libc::read(pipe[0], buffer.add(4000).cast(), 100) };
    assert_eq!(got, 100);
    // The third page is mapped by no table.
    assert_eq!(
        machine.host_window_prefault(start + 4096u64, 8193),
        Err(start + 8192u64)
    );
    // An empty range is held by no page, aligned or not: there was one to fault in
    // when it did not start a page.
    let third = start + 8192u64;
    assert_eq!(machine.host_window_prefault(third, 0), Ok(()));
    assert_eq!(machine.host_window_prefault(third + 8u64, 0), Ok(()));
    for fd in pipe {
        // SAFETY: descriptors this test opened.
        unsafe { libc::close(fd) };
    }
}
