//! Test support: the fuzz targets' seed and regression inputs, replayed by the unit
//! tests beside each parser so a plain `cargo test` re-checks them.
//!
//! Compiled for tests only; reads files, never writes.

use std::path::{Path, PathBuf};

/// The files of `fuzz/corpus/<target>` and of `fuzz/regressions/<target>` when it exists.
pub(crate) fn fuzz_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let seeds = std::fs::read_dir(&corpus).unwrap_or_else(|e| panic!("{}: {e}", corpus.display()));
    let regressions = std::fs::read_dir(fuzz.join("regressions").join(target));
    let inputs: Vec<_> = seeds
        .chain(regressions.into_iter().flatten())
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    assert!(!inputs.is_empty(), "{} is empty", corpus.display());
    inputs
}
