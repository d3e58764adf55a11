//! Whether this build has DPDK: the `dpdk` feature, and libdpdk found by `dpdk-sys`'s build
//! (its `found` metadata). Without both, `dev::dpdk` is the stub that refuses DPDK ports.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(dpdk)");
    let feature = std::env::var_os("CARGO_FEATURE_DPDK").is_some();
    let found = std::env::var("DEP_DPDK_FOUND").is_ok_and(|f| f == "1");
    if feature && found {
        println!("cargo:rustc-cfg=dpdk");
    }
}
