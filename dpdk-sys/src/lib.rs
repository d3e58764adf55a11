//! Raw FFI to DPDK. Only the crate skeleton exists so far: bindgen over `libdpdk` and the C shim
//! for the static-inline hot functions arrive with DPDK poll-mode-driver ports. No safe API here.
#![no_std]
