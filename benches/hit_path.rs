//! Micro-benchmarks of what a hit does in the process: derive the Redis key
//! of a request's cache key, decode the values `HMGET` returned, build the
//! response.
//!
//! `cargo bench --bench hit_path` (criterion; `-- --quick` for a short run).
//!
//! `near/get_*` are near-cache hits from 1 thread, from as many threads as
//! the machine has cores, and from 4: each thread does the measured number
//! of hits, so the time shown is wall time per hit per thread (no loss
//! against one thread means the same time up to the core count, and
//! threads ÷ cores times it beyond). `spread`: 1,024 URLs, each thread
//! going through them from its own place; `hot`: every thread on one URL.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

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

/// `iters` near hits from each of `threads` threads started together: the
/// wall time from the first thread's start to the last one's end (each
/// thread reads the clock itself: one released by the barrier may be done
/// before another is scheduled).
fn near_hits(near: &internals::NearCache, keys: &[String], threads: usize, iters: u64) -> Duration {
    let start = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    let mut i = t * keys.len() / threads;
                    start.wait();
                    let began = Instant::now();
                    for _ in 0..iters {
                        assert!(near.get(black_box(&keys[i]), 1_000));
                        i += 1;
                        if i == keys.len() {
                            i = 0;
                        }
                    }
                    (began, Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    last - first
}

fn near(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let near = internals::NearCache::new(64 << 20);
    let spread: Vec<String> = (0..1024)
        .map(|i| internals::entry_key("cachefence:", &format!("/products/{i}\nhost:shop.example")))
        .collect();
    for key in &spread {
        assert!(near.admit(key, 4096, u64::MAX));
    }
    let hot = vec![spread[0].clone()];
    let mut threads = vec![1, cores, 4];
    threads.dedup();
    for (name, keys) in [("spread", &spread), ("hot", &hot)] {
        for &n in &threads {
            c.bench_function(&format!("near/get_{name}_{n}_threads"), |b| {
                b.iter_custom(|iters| near_hits(&near, keys, n, iters))
            });
        }
    }
}

criterion_group!(hit_path, benches, near);
criterion_main!(hit_path);
