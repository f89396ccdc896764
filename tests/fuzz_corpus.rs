//! Replays the fuzz corpora (`tests/fuzz_corpus/<target>/*`) through the
//! fuzz targets' checks on stable, as an ordinary test. The checks are the
//! very code the fuzz targets run (`tests/fuzz_corpus/<target>.rs`, which
//! `fuzz/fuzz_targets/` includes with `#[path]`).

#[path = "fuzz_corpus/keys.rs"]
mod keys;

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (name, data)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_keys_corpus_passes_the_keys_checks() {
    let files = corpus("keys");
    assert!(!files.is_empty(), "the keys corpus is empty");
    for (name, data) in files {
        let outcome = std::panic::catch_unwind(|| keys::check(&data));
        assert!(
            outcome.is_ok(),
            "tests/fuzz_corpus/keys/{name} fails the checks"
        );
    }
}

#[test]
fn the_keys_checks_catch_a_host_conflict_and_keep_the_one_without() {
    // Both with_host branches, whatever the corpus holds.
    keys::check(b"http://a.example/p?b=1&a=2\nhost: b.example\nx-t: 1");
    keys::check(b"http://a.example/p\nhost: A.example");
    keys::check(b"/p?b=1&a=2\nhost: a.example\naccept: x");
    keys::check(b"*");
    keys::check(b"a.example:80");
}
