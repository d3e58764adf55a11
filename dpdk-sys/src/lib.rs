//! Raw FFI to DPDK 22.11: bindgen's output over `wrapper.h` plus the `rs_*` shim functions
//! (shim.c) for the static-inline hot path. No safe API here: that is dataplane's `dpdk` module.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]

#[cfg(dpdk_found)]
include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
