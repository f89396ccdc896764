//! Micro-benchmarks of what a hit does in the process: derive the Redis key
//! of a request's cache key, decode the values `HMGET` returned, build the
//! response.
//!
//! `cargo bench --bench hit_path` (criterion; `-- --quick` for a short run).

use std::hint::black_box;

use cachefence::internals;
use cachefence::key::{DefaultKey, MakeKey};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

fn benches(c: &mut Criterion) {
    let req = http::Request::get("/products/42?b=2&a=1")
        .header("host", "shop.example")
        .header("accept", "text/html")
        .body(())
        .unwrap();
    let (parts, ()) = req.into_parts();
    let key = DefaultKey::new();
    c.bench_function("key/default_key", |b| {
        b.iter(|| key.make_key(black_box(&parts)))
    });
    let cache_key = key.make_key(&parts).unwrap();
    c.bench_function("key/entry_key", |b| {
        b.iter(|| internals::entry_key(black_box("cachefence:"), black_box(&cache_key)))
    });
    for len in [4 * 1024, 64 * 1024] {
        let values = internals::sample_values(len, 1_000);
        c.bench_function(&format!("entry/decode_{}k", len / 1024), |b| {
            b.iter_batched(
                || values.clone(),
                |v| internals::decode_values(v, 2_000),
                BatchSize::SmallInput,
            )
        });
        c.bench_function(&format!("response/hit_{}k", len / 1024), |b| {
            b.iter_batched(
                || values.clone(),
                |v| internals::hit_response(v, 2_000),
                BatchSize::SmallInput,
            )
        });
    }
    // A script's reply (ACQUIRE finding an entry): field-value pairs.
    let fields = internals::sample_fields(4 * 1024, 1_000);
    c.bench_function("entry/decode_pairs_4k", |b| {
        b.iter_batched(
            || fields.clone(),
            |f| internals::decode(f, 2_000),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(hit_path, benches);
criterion_main!(hit_path);
