//! Finds libdpdk with pkg-config, compiles the C shim with its cflags and runs bindgen over the
//! headers ringswitch uses. Links dynamically: Debian's DPDK loads its PMD plugins by itself.
//! Without libdpdk (and without RINGSWITCH_REQUIRE_DPDK) the crate builds empty.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.h");
    println!("cargo:rerun-if-changed=shim.c");
    println!("cargo:rerun-if-env-changed=RINGSWITCH_REQUIRE_DPDK");
    println!("cargo::rustc-check-cfg=cfg(dpdk_found)");
    let dpdk = match pkg_config::Config::new()
        .atleast_version("22.11")
        .probe("libdpdk")
    {
        Ok(d) => d,
        // Without libdpdk the crate is empty and `dataplane` builds its DPDK stub (told by the
        // `found` metadata), so a contributor without DPDK still builds and tests the rest.
        // The test script sets RINGSWITCH_REQUIRE_DPDK: there a missing DPDK is an error.
        Err(e) if std::env::var_os("RINGSWITCH_REQUIRE_DPDK").is_none() => {
            println!("cargo:warning=libdpdk not found by pkg-config ({e}); building without DPDK: dpdk ports will be refused (Debian: apt-get install dpdk-dev)");
            println!("cargo:found=0");
            return;
        }
        Err(e) => {
            panic!("libdpdk not found by pkg-config (Debian: apt-get install dpdk-dev): {e}")
        }
    };
    println!("cargo:found=1");
    println!("cargo:rustc-cfg=dpdk_found");
    // Cflags beyond -I (`-include rte_config.h -march=corei7`) are needed by the headers.
    let extra: Vec<String> = std::process::Command::new("pkg-config")
        .args(["--cflags-only-other", "libdpdk"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| split_flags(&s))
        .unwrap_or_default();
    let includes: Vec<String> = dpdk
        .include_paths
        .iter()
        .map(|p| format!("-I{}", p.display()))
        .collect();

    let mut cc = cc::Build::new();
    cc.file("shim.c").include(".").opt_level(3);
    for f in includes.iter().chain(&extra) {
        cc.flag(f);
    }
    cc.compile("rs_dpdk_shim");

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg("-I.")
        .clang_args(&includes)
        .clang_args(&extra)
        .allowlist_function("rte_.*|rs_.*")
        .allowlist_type("rte_.*")
        .allowlist_var("RTE_.*|SOCKET_ID_ANY|rs_.*")
        // Packed-and-aligned wire structs bindgen cannot lay out; ringswitch never reads them.
        .opaque_type("rte_arp_ipv4|rte_arp_hdr|rte_l2tpv2_combined_msg_hdr|rte_gtp_psc_generic_hdr")
        .derive_default(true)
        .layout_tests(true)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen over the DPDK headers");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs");
}

/// Split a pkg-config flag string into arguments (`-include FILE` stays two arguments, in order).
fn split_flags(s: &str) -> Vec<String> {
    s.split_whitespace()
        .filter(|f| !f.starts_with("-Wl,"))
        .map(str::to_owned)
        .collect()
}
