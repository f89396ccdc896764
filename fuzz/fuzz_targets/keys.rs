//! Fuzzes the default cache key through the public API:
//! `cargo +nightly fuzz run keys ../tests/fuzz_corpus/keys` (from the `fuzz/`
//! directory).
//!
//! The checks and the corpus live in the main crate's `tests/fuzz_corpus/`,
//! so `tests/fuzz_corpus.rs` replays the corpus through them on stable, also
//! from the published package (cargo leaves this nested crate out of it).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzz_corpus/keys.rs"]
mod keys;

fuzz_target!(|data: &[u8]| keys::check(data));
