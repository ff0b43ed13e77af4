//! Fuzz target: `Config::parse` on any text accepts it or reports problems, never
//! panics, and every problem's line is a line of the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pginval::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(Path::new("fuzz.toml"), text, |_| None) {
        let lines = text.matches('\n').count() + 1;
        for p in &e.problems {
            if let Some(line) = p.line {
                assert!((1..=lines).contains(&line), "line {line} of {lines}: {p:?}");
            }
        }
        let _ = e.to_string();
    }
});
