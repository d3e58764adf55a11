//! Configuration files as an operator (or a typo) writes them: the fuzzer's bytes as a main
//! file with one port file beside it in `ports.d/` (split at the first 0xff byte), loaded as
//! start-up and `ringswitch check` load them, and the port file alone as `ctl add-port` sends
//! it. Nothing may panic, and every refusal names the file it is about.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// A directory of our own for the run, with its `ports.d`: in memory (/dev/shm) where there
/// is one, as two files are written for every input.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("rs-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(d.join("ports.d")).expect("fuzz dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let (main, port) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let d = dir();
    let (main_file, port_file) = (d.join("main.toml"), d.join("ports.d").join("p.toml"));
    std::fs::write(&main_file, main).expect("write main");
    std::fs::write(&port_file, port).expect("write port");
    if let Err(e) = control::config::Config::load(&main_file) {
        // The main file, a port file in ports.d, or one in a `ports_dir` the main file names
        // (its errors are about that file; a ports_dir that cannot be read is the main
        // file's error).
        let msg = e.to_string();
        let file = msg.split(": ").next().unwrap_or_default();
        assert!(
            file == main_file.display().to_string()
                || file.starts_with(&d.join("ports.d").display().to_string())
                || (file.ends_with(".toml") && std::path::Path::new(file).is_file()),
            "an error that names no file: {msg}"
        );
    }
    if let Ok(text) = std::str::from_utf8(port) {
        if let Err(e) = control::config::port_from_text(&port_file, text) {
            assert!(e.to_string().starts_with(&port_file.display().to_string()));
        }
    }
});
