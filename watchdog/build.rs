//! Embeds the kernel programs' object when it has been built.
//!
//! `cargo xtask build-ebpf` writes the object to
//! target/ebpf/bpfel-unknown-none/release/watchdog-ebpf (or set
//! WATCHDOG_EBPF_OBJECT to another path). When it is absent (no bpf-linker,
//! macOS, a plain `cargo build`), the crate still builds and the binary says
//! at run time that it has no kernel programs.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(watchdog_ebpf)");
    println!("cargo::rerun-if-env-changed=WATCHDOG_EBPF_OBJECT");

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = env::var_os("WATCHDOG_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../target/ebpf/bpfel-unknown-none/release/watchdog-ebpf")
        });
    println!("cargo::rerun-if-changed={}", object.display());

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "linux" || !object.is_file() {
        return;
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("watchdog.bpf.o");
    if let Err(err) = fs::copy(&object, &out) {
        panic!(
            "failed to copy {} to {}: {err}",
            object.display(),
            out.display()
        );
    }
    println!("cargo::rustc-cfg=watchdog_ebpf");
}
