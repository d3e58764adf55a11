//! ringswitch's control plane as a library: config loading, the vhost-user backend, PMD and port
//! management, and the control socket. The `ringswitch` binary (main.rs) is a thin CLI over it;
//! fuzz targets and integration tests drive the same code.

pub mod config;
pub mod ctl;
pub mod switch;
pub mod vhost_user;
