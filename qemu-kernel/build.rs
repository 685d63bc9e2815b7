//! Link the kernel as a static, non-PIE ELF image loaded at 1 MiB (see `link.ld`).
//!
//! The arguments go to the `bin` only: in RUSTFLAGS they would also reach the build
//! scripts of dependencies, which then fail to link.

fn main() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("link.ld");
    for arg in [
        "-nostartfiles",
        "-nodefaultlibs",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=0x1000",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
}
