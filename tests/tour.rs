//! The tour a new user runs first must keep working and keep saying what it shows.

use std::process::Command;

#[test]
fn the_tour_shows_scattered_frames_and_returns_everything() {
    // `cargo test` builds the examples next to the test binaries.
    let deps = std::env::current_exe().unwrap();
    let tour = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("tour");
    let output = if tour.exists() {
        Command::new(&tour).output().unwrap()
    } else {
        Command::new(env!("CARGO"))
            .args(["run", "--quiet", "--example", "tour"])
            .output()
            .unwrap()
    };
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the tour failed:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let frames: Vec<u64> = text
        .lines()
        .filter_map(|line| line.split("-> frame ").nth(1))
        .map(|rest| {
            u64::from_str_radix(
                rest.split_whitespace()
                    .next()
                    .unwrap()
                    .trim_start_matches("0x"),
                16,
            )
            .unwrap()
        })
        .collect();
    assert_eq!(frames.len(), 8, "one line per page:\n{text}");
    let adjacent = frames.windows(2).filter(|w| w[1] == w[0] + 4096).count();
    assert!(adjacent < 4, "the frames should be scattered:\n{text}");
    assert!(
        text.contains("tour_buffer examples/tour.rs:") && text.contains("pages=8 vmalloc"),
        "vmallocinfo listing:\n{text}"
    );
    assert!(text.contains("PageFault"), "the guard page faults:\n{text}");
    assert!(
        text.contains("diagnosis: write past the end of 'tour_buffer' (32 KiB vmalloc")
            && text.contains("allocated at examples/tour.rs:")
            && text.contains(": guard page"),
        "the guard-page fault diagnosed:\n{text}"
    );
    assert!(
        text.contains("diagnosis: write below 'kernel stack' (16 KiB stack at")
            && text.contains(": stack overflow"),
        "the stack overflow diagnosed:\n{text}"
    );
    assert!(
        text.contains("InteriorPointer") && text.contains("NotAllocated"),
        "bad vfree errors:\n{text}"
    );
    assert!(
        text.contains("frames returned"),
        "everything is given back:\n{text}"
    );
    // The sites the README shows the tour printing are the ones it prints.
    let readme = include_str!("../README.md");
    let cited: Vec<&str> = readme
        .split("examples/tour.rs:")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .collect();
    assert!(!cited.is_empty(), "the README shows the tour's sites");
    for line in cited {
        assert!(
            text.contains(&format!("examples/tour.rs:{line} ")),
            "the README shows the tour printing examples/tour.rs:{line}:\n{text}"
        );
    }
}
