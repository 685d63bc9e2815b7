//! Physical memory: where it lives on the host, the helpers that read and write
//! it, accesses past its end, and the empty root table.

use super::*;

#[test]
fn phys_memory_is_at_phys_offset() {
    let machine = machine();
    let addr = PhysAddr::new(0x12_3456);
    let ptr = machine.phys().phys_to_virt(addr);
    assert_eq!(ptr as u64, machine.phys_offset().as_u64() + addr.as_u64());
    assert_eq!(machine.phys_offset().as_u64() % 4096, 0);
}

#[test]
fn phys_helpers_round_trip() {
    let machine = machine();
    let frame = frame_at(0x50_0000);
    assert!(
        machine.frame_bytes(frame).iter().all(|&b| b == 0),
        "memory starts zeroed"
    );
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.fill_phys(frame.start_address(), 4096, 0xaa) };
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(frame.start_address() + 100u64, b"hello") };
    let bytes = machine.frame_bytes(frame);
    assert_eq!(&bytes[100..105], b"hello");
    assert_eq!(bytes[99], 0xaa);
    assert_eq!(bytes[105], 0xaa);
    let mut back = [0; 5];
    machine.read_phys(frame.start_address() + 100u64, &mut back);
    assert_eq!(&back, b"hello");
}

#[test]
#[should_panic(expected = "outside the simulated memory")]
fn phys_address_past_the_end_panics() {
    let machine = machine();
    machine.phys().phys_to_virt(PhysAddr::new(64 * MIB));
}

#[test]
#[should_panic(expected = "outside the simulated memory")]
fn phys_write_running_past_the_end_panics() {
    let machine = machine();
    // SAFETY: bytes the test owns: no live Rust value lives there.
    unsafe { machine.write_phys(PhysAddr::new(64 * MIB - 2), b"abc") };
}

#[test]
fn root_table_starts_empty() {
    let machine = machine();
    assert!(machine.frame_bytes(machine.root()).iter().all(|&b| b == 0));
    assert_eq!(machine.tlb_len(), 0);
    let range = KERNEL_IMAGE_START..KERNEL_IMAGE_END;
    assert!(range.contains(&machine.root().start_address().as_u64()));
}

/// A bulk free the allocator refuses (a frame in it free already, or listed twice)
/// gives nothing back, so `PoisonOnFree` poisons none of its frames: the others
/// are still their owner's, data and all. An accepted one poisons each frame once.
#[test]
fn poison_on_free_leaves_the_frames_of_a_refused_bulk_free_alone() {
    use vmalloc::FrameSource;
    let machine = machine();
    let frames = machine.frames();
    let poisoner = PoisonOnFree::new(&machine, &frames);
    let poison = &poisoner;
    let kept = poison.alloc_frame().unwrap();
    let freed = poison.alloc_frame().unwrap();
    // SAFETY: a frame the test took and no longer uses.
    unsafe { poison.free_frame(freed) }.unwrap();
    // SAFETY: bytes of a frame the test owns.
    unsafe { machine.fill_phys(kept.start_address(), 4096, 0x11) };
    for refused in [[kept, freed], [kept, kept]] {
        // SAFETY: deliberately wrong, and refused whole.
        assert!(unsafe { poison.free_frames(&refused) }.is_err());
        assert!(
            machine.frame_bytes(kept).iter().all(|&b| b == 0x11),
            "{refused:?}"
        );
    }
    assert_eq!(poison.poisoned(), 1);
    // SAFETY: the frame is the test's and unused.
    unsafe { poison.free_frames(&[kept]) }.unwrap();
    assert!(machine.frame_bytes(kept).iter().all(|&b| b == POISON));
    assert_eq!(poison.poisoned(), 2);
}
