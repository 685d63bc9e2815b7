//! Boots the test kernel (`qemu-kernel/`) under QEMU and checks its report.
//!
//! The kernel runs its checks on a real (emulated) MMU and prints one line per
//! check on the serial port; this test asserts each of them, the set that ran, the
//! summary and QEMU's exit status. Without `qemu-system-x86_64` the test says so and
//! passes, unless `VMALLOC_REQUIRE_QEMU=1` (set by `.ci/run`) makes that a failure.
//!
//! One check asks QEMU itself: the kernel describes pages of its areas on COM2 (see
//! `qemu-kernel/src/checks/oracle.rs`), and this test compares each with QEMU's own
//! walk of the live page tables (the monitor's `info tlb`) and with the physical
//! memory QEMU says the page is (`xp`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
/// Guest RAM; the kernel checks its memory map against it.
const GUEST_MEM_MIB: u32 = 128;
/// Guest CPUs. With multi-threaded TCG each vCPU runs on its own host thread with its
/// own TLB, which only the guest's own `invlpg` and CR3 writes invalidate: a missing
/// shootdown leaves a stale translation there, as on hardware.
const GUEST_CPUS: u32 = 4;
/// A run that takes longer has hung (TCG boots and runs the suite in well under a
/// minute).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// A check that reports no result for this long has hung (a deadlock): the run is
/// killed and the check named. The slowest check takes under 20 s under TCG.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// QEMU's status for the kernel's success value 0x10 written to isa-debug-exit:
/// `(0x10 << 1) | 1`. Anything else, including 0 after a triple fault, is failure.
const SUCCESS_STATUS: i32 = 33;
/// Checks the suite must contain at least: the kernel's own machinery, then the
/// library's, then the library's on every CPU at once.
const REQUIRED_CHECKS: &[&str] = &[
    "memory_map",
    "address_space",
    "fault_probe_read",
    "fault_probe_write_readonly",
    "fault_probe_exec_nx",
    "apic_version",
    "frame_allocator",
    "vmalloc_large",
    "vzalloc_zeroed",
    "no_frame_reused_before_purge",
    "use_after_free_faults",
    "guard_page_faults",
    "readonly_write_faults",
    "nx_faults",
    "second_address_space",
    "ioremap_apic",
    "qemu_walk_agrees",
    "heap_global_alloc",
    "info_listing_under_global_heap",
    "vmalloc_huge",
    "stress",
    "kernel_stack_overflow",
    "set_prot_tree_area",
    "vzalloc_block_zeroed",
    "stack_cache_reuse",
    "huge_split_keeps_nx",
    "frame_double_free_refused",
    "vrealloc_regrow_zeroed",
    "heap_overaligned",
    "heap_guarded_faults",
    "smp_cpus_online",
    "smp_stress",
    "smp_stale_translation_faults",
    "smp_local_only_flush_is_caught",
    "smp_freed_frame_poison_unseen",
    "smp_poison_seen_with_local_only_flush",
    "smp_shootdown_acks_after_flush",
    "smp_shootdown_nested_acks_after_flush",
    "smp_early_ack_is_caught",
    "smp_crossing_purges",
    "smp_heap",
    "smp_irq_storm",
    "recursive_window_manager",
];

#[test]
fn qemu_kernel_checks() {
    if !qemu_installed() {
        let missing = "qemu-system-x86_64 not found; install the Debian package qemu-system-x86";
        assert!(
            std::env::var("VMALLOC_REQUIRE_QEMU").as_deref() != Ok("1"),
            "VMALLOC_REQUIRE_QEMU=1 but {missing}"
        );
        // Straight to the stderr handle: the test harness captures `eprintln!`.
        let _ = writeln!(std::io::stderr(), "tests/qemu.rs skipped: {missing}");
        return;
    }
    let kernel = build_kernel();
    let (status, serial, walk) = boot(&kernel);
    println!("{serial}");
    let report = Report::parse(&serial);
    let walk = walk.unwrap_or_else(|why| panic!("comparing with QEMU's page walk: {why}"));
    println!("{} pages compared with QEMU's page walk", walk.compared);
    assert!(
        walk.mismatches.is_empty(),
        "QEMU's page walk disagrees:\n{}",
        walk.mismatches.join("\n")
    );
    assert!(
        walk.control_caught,
        "the control line (a tag no page holds) was not found wrong"
    );
    assert!(
        walk.compared >= 100,
        "only {} pages compared with QEMU's walk",
        walk.compared
    );

    let planned = report
        .planned
        .unwrap_or_else(|| panic!("kernel never reached its checks:\n{serial}"));
    for (name, result) in &report.checks {
        assert!(
            result == "ok",
            "check {name}: {}\n--- serial output ---\n{serial}",
            if result.is_empty() {
                "did not finish"
            } else {
                result
            }
        );
    }
    let ran: Vec<&str> = report
        .checks
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        ran.len(),
        planned,
        "{planned} checks planned, {} reported:\n{serial}",
        ran.len()
    );
    for required in REQUIRED_CHECKS {
        assert!(
            ran.contains(required),
            "check {required} did not run:\n{serial}"
        );
    }
    // The guarded pool's diagnoses of the three bugs `heap_guarded_faults` commits,
    // as the kernel printed them.
    for diagnosis in [
        "out-of-bounds write past the end of a 24-byte heap object",
        "out-of-bounds read before the start of a 24-byte heap object",
        "use after free: read of a 24-byte heap object",
    ] {
        assert!(
            serial.contains(diagnosis),
            "no \"{diagnosis}\" printed:\n{serial}"
        );
    }
    assert_eq!(
        report.summary.as_deref(),
        Some(format!("checks: {planned} passed, 0 failed").as_str()),
        "summary line:\n{serial}"
    );
    assert_eq!(
        status.code(),
        Some(SUCCESS_STATUS),
        "QEMU exit status {status}:\n{serial}"
    );
}

/// What the kernel printed: `checks: running N`, `check <name> ... <result>` lines
/// and `checks: N passed, M failed`.
struct Report {
    planned: Option<usize>,
    checks: Vec<(String, String)>,
    summary: Option<String>,
}

impl Report {
    fn parse(serial: &str) -> Self {
        let mut report = Report {
            planned: None,
            checks: Vec::new(),
            summary: None,
        };
        for line in serial.lines().map(str::trim_end) {
            if let Some(count) = line.strip_prefix("checks: running ") {
                report.planned = count.parse().ok();
            } else if let Some(check) = line.strip_prefix("check ") {
                let (name, result) = check.split_once(" ...").unwrap_or((check, ""));
                report
                    .checks
                    .push((name.to_owned(), result.trim().to_owned()));
            } else if line.starts_with("checks: ") {
                report.summary = Some(line.to_owned());
            }
        }
        report
    }
}

fn qemu_installed() -> bool {
    match Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(error) if error.kind() == ErrorKind::NotFound => false,
        Err(error) => panic!("cannot run {QEMU}: {error}"),
    }
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the kernel in its own target directory (so it never waits for the lock
/// of the build running this test) and converts it to the 32-bit ELF that QEMU's
/// multiboot loader accepts.
fn build_kernel() -> PathBuf {
    let target_dir = repo_root().join("target/qemu-kernel");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--manifest-path"])
        .arg(repo_root().join("qemu-kernel/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .expect("cannot run cargo");
    assert!(
        status.success(),
        "building the test kernel failed: {status}"
    );

    let elf32 = target_dir.join("vmalloc-qemu-kernel.elf32");
    let status = Command::new("objcopy")
        .args(["-O", "elf32-i386"])
        .arg(target_dir.join("release/vmalloc-qemu-kernel"))
        .arg(&elf32)
        .status()
        .expect("cannot run objcopy (Debian package binutils)");
    assert!(status.success(), "objcopy failed: {status}");
    elf32
}

/// Boots `kernel` and returns QEMU's exit status and the serial output. Fails the
/// test, naming the check, if a check reports no result within [`CHECK_TIMEOUT`] or
/// the whole run outlives [`BOOT_TIMEOUT`].
fn boot(kernel: &Path) -> (ExitStatus, String, Result<WalkReport, String>) {
    let sockets = std::env::temp_dir().join(format!("vmalloc-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&sockets).expect("socket directory");
    let (harness, qmp) = (sockets.join("harness"), sockets.join("qmp"));
    let mut qemu = Command::new(QEMU)
        .args([
            "-accel",
            "tcg,thread=multi",
            "-m",
            &format!("{GUEST_MEM_MIB}M"),
        ])
        .args(["-smp", &GUEST_CPUS.to_string()])
        .args([
            "-nographic",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ])
        // COM2 is the kernel's line to this test; QEMU waits until it is connected.
        .arg("-chardev")
        .arg(format!(
            "socket,id=harness,path={},server=on,wait=on",
            harness.display()
        ))
        .args(["-serial", "chardev:harness"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-no-reboot", "-nic", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(kernel)
        .args([
            "-append",
            &format!("expect_mem_mib={GUEST_MEM_MIB} cpus={GUEST_CPUS}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start QEMU");
    let walk = thread::spawn(move || compare_walks(&harness, &qmp));
    let serial = SharedOutput::default();
    let stdout = serial.fill_from(qemu.stdout.take());
    let stderr = SharedOutput::default();
    let stderr_reader = stderr.fill_from(qemu.stderr.take());
    let ending = watch(&mut qemu, &serial);
    stdout.join().expect("stdout reader");
    stderr_reader.join().expect("stderr reader");
    let (serial, errors) = (serial.text(), stderr.text());
    let status = match ending {
        Ending::Exited(status) => status,
        Ending::CheckHung(name) => panic!(
            "check {name} hung: no result in {} s\n--- serial output so far ---\n{serial}\n--- stderr ---\n{errors}",
            CHECK_TIMEOUT.as_secs()
        ),
        Ending::TimedOut(running) => panic!(
            "QEMU killed after {} s, {}:\n{serial}\n--- stderr ---\n{errors}",
            BOOT_TIMEOUT.as_secs(),
            match running {
                Some(name) => format!("while check {name} was running"),
                None => "with no check running".to_owned(),
            }
        ),
    };
    if !errors.trim().is_empty() {
        eprintln!("QEMU stderr:\n{errors}");
    }
    let walk = walk
        .join()
        .unwrap_or_else(|_| Err("the comparing thread panicked".into()));
    let _ = std::fs::remove_dir_all(&sockets);
    (status, serial, walk)
}

/// What the comparison with QEMU's page walk found.
struct WalkReport {
    /// Pages compared (the control line not counted).
    compared: usize,
    /// Each page QEMU's walk or its memory disagrees about, described.
    mismatches: Vec<String>,
    /// Whether the control line (a tag no page holds) was found wrong.
    control_caught: bool,
}

/// A page as the kernel says QEMU's walk must find it: `walk <va> <tag> <pa>
/// <flags>`, `-` where it names no tag or frame.
struct Expected {
    control: bool,
    va: u64,
    tag: Option<u64>,
    pa: Option<u64>,
    /// `info tlb`'s flag letters, `?` where any will do; `none`: not mapped.
    flags: String,
}

impl Expected {
    fn parse(line: &str) -> Option<Self> {
        let (kind, rest) = line.split_once(' ')?;
        let control = match kind {
            "walk" => false,
            "walk-control" => true,
            _ => return None,
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let [va, tag, pa, flags] = fields[..] else {
            return None;
        };
        let hex = |field: &str| (field != "-").then(|| u64::from_str_radix(field, 16).ok());
        Some(Self {
            control,
            va: hex(va)??,
            tag: hex(tag).map_or(Some(None), |tag| tag.map(Some))?,
            pa: hex(pa).map_or(Some(None), |pa| pa.map(Some))?,
            flags: flags.to_owned(),
        })
    }
}

/// A leaf `info tlb` printed: the physical address it maps and its flag letters.
struct Leaf {
    pa: u64,
    flags: String,
}

/// Bytes a leaf with `P` (a 2 MiB entry in the kernel's vmalloc region) maps.
const LARGE_LEAF: u64 = 2 << 20;

/// Serves the kernel's COM2: reads what it expects of each page and, when it waits,
/// compares with QEMU's walk through the QMP socket, then lets it go on.
fn compare_walks(harness: &Path, qmp: &Path) -> Result<WalkReport, String> {
    let stream = connect(harness)?;
    let mut answer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut expected = Vec::new();
    let mut report: Option<WalkReport> = None;
    let mut monitor = None;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let line = line.trim_end();
        if line == "walk-wait" {
            // Each wait compares what was described since the last one.
            let qmp = match &mut monitor {
                Some(qmp) => qmp,
                None => monitor.insert(Qmp::connect(qmp)?),
            };
            let round = compare(&std::mem::take(&mut expected), qmp)?;
            report = Some(match report {
                None => round,
                Some(mut total) => {
                    total.compared += round.compared;
                    total.mismatches.extend(round.mismatches);
                    total.control_caught |= round.control_caught;
                    total
                }
            });
            answer.write_all(b"g").map_err(|e| e.to_string())?;
        } else if let Some(page) = Expected::parse(line) {
            expected.push(page);
        } else if !line.is_empty() {
            return Err(format!("unexpected line on COM2: {line:?}"));
        }
    }
    report.ok_or_else(|| "the kernel never asked (no walk-wait on COM2)".into())
}

/// Connects to a socket QEMU serves, waiting for QEMU to make it.
fn connect(path: &Path) -> Result<UnixStream, String> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(error) => return Err(format!("{}: {error}", path.display())),
        }
    }
}

fn compare(expected: &[Expected], qmp: &mut Qmp) -> Result<WalkReport, String> {
    let leaves = parse_info_tlb(&qmp.human("info tlb")?);
    let mut report = WalkReport {
        compared: 0,
        mismatches: Vec::new(),
        control_caught: false,
    };
    for page in expected {
        let wrong = check_page(page, &leaves, qmp)?;
        match (page.control, wrong) {
            (true, wrong) => report.control_caught |= wrong.is_some(),
            (false, Some(why)) => report.mismatches.push(format!("{:#x}: {why}", page.va)),
            (false, None) => report.compared += 1,
        }
    }
    Ok(report)
}

/// What is wrong with `page` in QEMU's walk (`leaves`) and memory, if anything.
fn check_page(
    page: &Expected,
    leaves: &BTreeMap<u64, Leaf>,
    qmp: &mut Qmp,
) -> Result<Option<String>, String> {
    let covering = leaves.range(..=page.va).next_back().filter(|(va, leaf)| {
        let span = if leaf.flags.as_bytes().get(2) == Some(&b'P') {
            LARGE_LEAF
        } else {
            4096
        };
        page.va - **va < span
    });
    let Some((&leaf_va, leaf)) = covering else {
        return Ok((page.flags != "none").then(|| "not mapped in QEMU's walk".to_owned()));
    };
    if page.flags == "none" {
        return Ok(Some(format!("mapped in QEMU's walk to {:#x}", leaf.pa)));
    }
    let pa = leaf.pa + (page.va - leaf_va);
    let flags_agree = page.flags.len() == leaf.flags.len()
        && page
            .flags
            .bytes()
            .zip(leaf.flags.bytes())
            .all(|(want, got)| want == b'?' || want == got);
    if !flags_agree {
        return Ok(Some(format!(
            "flags {} in QEMU's walk, {} expected",
            leaf.flags, page.flags
        )));
    }
    if page.pa.is_some_and(|want| want != pa) {
        return Ok(Some(format!(
            "QEMU's walk maps it to {pa:#x}, the kernel says {:#x}",
            page.pa.unwrap_or_default()
        )));
    }
    if let Some(tag) = page.tag {
        let read = qmp.human(&format!("xp /1gx {pa:#x}"))?;
        let value = read.split_once(": ").and_then(|(_, value)| {
            u64::from_str_radix(value.trim().trim_start_matches("0x"), 16).ok()
        });
        if value != Some(tag) {
            return Ok(Some(format!(
                "the memory QEMU's walk leads to ({pa:#x}) holds {read:?}, not the tag {tag:#x} written through the page"
            )));
        }
    }
    Ok(None)
}

/// `info tlb`'s lines (`<va>: <pa> <flags>`), by virtual address.
fn parse_info_tlb(text: &str) -> BTreeMap<u64, Leaf> {
    text.lines()
        .filter_map(|line| {
            let (va, rest) = line.trim().split_once(": ")?;
            let (pa, flags) = rest.trim().split_once(' ')?;
            let va = u64::from_str_radix(va, 16).ok()?;
            let pa = u64::from_str_radix(pa, 16).ok()?;
            Some((
                va,
                Leaf {
                    pa,
                    flags: flags.trim().to_owned(),
                },
            ))
        })
        .collect()
}

/// A QMP connection that runs human monitor commands.
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self, String> {
        let stream = connect(path)?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self {
            writer,
            reader: BufReader::new(stream),
        };
        qmp.reply()?; // the greeting
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    /// The next reply that is not an event.
    fn reply(&mut self) -> Result<serde_json::Value, String> {
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("QMP closed".into());
            }
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP said {line:?}: {e}"))?;
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    }

    fn execute(&mut self, command: &str) -> Result<serde_json::Value, String> {
        writeln!(self.writer, "{command}").map_err(|e| e.to_string())?;
        let reply = self.reply()?;
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| format!("QMP refused {command}: {reply}"))
    }

    fn human(&mut self, command: &str) -> Result<String, String> {
        let request = serde_json::json!({
            "execute": "human-monitor-command",
            "arguments": { "command-line": command },
        });
        match self.execute(&request.to_string())? {
            serde_json::Value::String(text) => Ok(text),
            other => Err(format!("{command}: {other}")),
        }
    }
}

/// What a pipe has delivered so far, readable while a thread keeps filling it.
#[derive(Clone, Default)]
struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl SharedOutput {
    /// Appends everything `pipe` delivers, on a thread of its own, until it closes.
    fn fill_from(&self, pipe: Option<impl Read + Send + 'static>) -> JoinHandle<()> {
        let mut pipe = pipe.expect("piped");
        let output = self.clone();
        thread::spawn(move || {
            let mut chunk = [0; 4096];
            while let Ok(read @ 1..) = pipe.read(&mut chunk) {
                output
                    .0
                    .lock()
                    .expect("output lock")
                    .extend_from_slice(&chunk[..read]);
            }
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("output lock")).into_owned()
    }
}

/// How a run ended.
enum Ending {
    /// QEMU exited on its own.
    Exited(ExitStatus),
    /// QEMU was killed: this check had reported nothing for [`CHECK_TIMEOUT`].
    CheckHung(String),
    /// QEMU was killed after [`BOOT_TIMEOUT`], while this check (if any) was running.
    TimedOut(Option<String>),
}

/// Waits for QEMU while watching the serial output: kills it when the check it is
/// running has had no result for [`CHECK_TIMEOUT`], or when the run outlives
/// [`BOOT_TIMEOUT`].
fn watch(qemu: &mut Child, serial: &SharedOutput) -> Ending {
    let started = Instant::now();
    let mut running: Option<(String, Instant)> = None;
    let ending = loop {
        if let Some(status) = qemu.try_wait().expect("waiting for QEMU") {
            return Ending::Exited(status);
        }
        let now = Instant::now();
        running = match (running_check(&serial.text()), running) {
            (Some(name), Some((same, since))) if name == same => Some((same, since)),
            (Some(name), _) => Some((name, now)),
            (None, _) => None,
        };
        if let Some((name, since)) = &running
            && now - *since > CHECK_TIMEOUT
        {
            break Ending::CheckHung(name.clone());
        }
        if now - started > BOOT_TIMEOUT {
            break Ending::TimedOut(running.map(|(name, _)| name));
        }
        thread::sleep(Duration::from_millis(50));
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    ending
}

/// The check the kernel is running: the last line is `check <name> ... ` with no
/// result after it yet.
fn running_check(serial: &str) -> Option<String> {
    let last = serial.rsplit('\n').next()?;
    let (name, result) = last.strip_prefix("check ")?.split_once(" ...")?;
    result.trim().is_empty().then(|| name.to_owned())
}
