#!/bin/sh
# Build the test kernel and boot it by hand: sh qemu-kernel/run.sh [extra qemu args]
# Exit status 33 means every check passed (isa-debug-exit value 0x10).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target="$here/../target/qemu-kernel"
cargo build --release --manifest-path "$here/Cargo.toml" --target-dir "$target"
objcopy -O elf32-i386 "$target/release/vmalloc-qemu-kernel" "$target/vmalloc-qemu-kernel.elf32"
exec qemu-system-x86_64 -accel tcg,thread=multi -smp 4 -m 128M -nographic -no-reboot -serial stdio -display none \
    -monitor none -nic none -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -kernel "$target/vmalloc-qemu-kernel.elf32" -append "expect_mem_mib=128 cpus=4" "$@"
