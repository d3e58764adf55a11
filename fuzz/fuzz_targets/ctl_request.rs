//! The control socket's request line as any client that may open the socket sends it (with
//! `control_socket_mode` 0666, any local user): parsed into a typed `Request` or refused,
//! never a panic; a request that parses means the same after a round trip through JSON, and
//! only a `stats` request is read-only.
#![no_main]

use control::ctl::protocol::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let line = serde_json::to_string(&r).expect("a parsed request serialises");
    assert!(!line.contains('\n'), "one line: {line}");
    assert_eq!(serde_json::from_str::<Request>(&line).ok().as_ref(), Some(&r));
    assert_eq!(r.changes(), !matches!(r, Request::Stats));
});
