//! ringswitch's measuring tools as a library: a vhost-user frontend (`frontend`) that plays
//! guests against any backend, for the hostile-guest test; the traffic engine (`traffic`) of
//! `rs-traffic`, which measures throughput, loss and one-way latency through a backend; and
//! latency plots (`plot`).

pub mod frontend;
pub mod plot;
pub mod traffic;
