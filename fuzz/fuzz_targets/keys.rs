//! Fuzzes the default cache key through the public API:
//! `cargo +nightly fuzz run keys` (from the `fuzz/` directory).
//!
//! The checks live in `fuzz/shared/keys.rs`, so `tests/fuzz_corpus.rs` can
//! replay the corpus through them on stable, and CI builds them.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../shared/keys.rs"]
mod keys;

fuzz_target!(|data: &[u8]| keys::check(data));
