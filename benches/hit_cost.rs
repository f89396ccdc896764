//! What one hit costs the app, in instructions: the load harness's app
//! (the same handler and hand-written cache-aside `naive` middleware, from
//! `benches/load/app.rs`, on the same route) driven without HTTP, on one thread, so that
//! `valgrind --tool=callgrind` (or `--tool=lackey`) counts the same
//! instructions run after run on a loaded machine, where wall-clock and
//! CPU time are not repeatable.
//!
//! ```text
//! cargo bench --bench hit_cost -- --arms naive,fence --hits 20000   # wall-clock, for a look
//! scripts/hit_cost.sh                                                # instructions per hit (callgrind)
//! ```
//!
//! Each arm runs `--warm` hits, then `--hits` more, `--conc` at a time, on
//! a current-thread Tokio runtime (the Redis client's driver task runs on
//! the same thread, so its work is counted). Instructions per hit are the
//! difference between two runs with different `--hits`, divided: set-up
//! and warm-up cancel out. Arms: `naive` (`GET`, the load harness's),
//! `fence` (`FenceCache::builder(HealingConnection::connect(client))`, as
//! the README builds it, with wake-ups), `fence-manager` (the same over a
//! `ConnectionManager` with its default settings). Uses `REDIS_URL`, else
//! `redis://127.0.0.1:6379/`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body as AxumBody;
use axum::middleware;
use axum::routing::get;
use cachefence::{FenceCache, HealingConnection};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{StatusCode, header};
use http_body_util::BodyExt;
use tower::Service;

#[path = "load/app.rs"]
mod load_app;

use load_app::{Naive, Origin, naive, small};

type Error = Box<dyn std::error::Error + Send + Sync>;

async fn app(arm: &str, client: &redis::Client) -> Result<Router, Error> {
    let routes = Router::new()
        .route("/k/{id}", get(small))
        .with_state(Origin::new(Duration::ZERO));
    Ok(match arm {
        "naive" => {
            let state = Naive {
                redis: client.get_connection_manager().await?,
                ttl_ms: 60_000,
                prefix: Arc::from("cost-naive:"),
                calls: Arc::new(AtomicU64::new(0)),
            };
            routes.layer(middleware::from_fn_with_state(state, naive))
        }
        "fence" => {
            let conn = HealingConnection::connect(client.clone()).await?;
            let cache = FenceCache::builder(conn).wake_ups(client.clone()).build()?;
            routes.layer(
                cache
                    .layer()
                    .namespace("cost-fence:")
                    .ttl(Duration::from_secs(600)),
            )
        }
        "fence-manager" => {
            let cache = FenceCache::builder(client.get_connection_manager().await?)
                .wake_ups(client.clone())
                .build()?;
            routes.layer(
                cache
                    .layer()
                    .namespace("cost-fence-manager:")
                    .ttl(Duration::from_secs(600)),
            )
        }
        other => return Err(format!("unknown arm {other}").into()),
    })
}

/// One GET of key `i % 10`; whether it was a 200 with the whole body.
async fn get_one(mut app: Router, i: usize) -> bool {
    let req = http::Request::get(format!("/k/{}", i % 10))
        .header(header::HOST, "bench.local")
        .body(AxumBody::empty());
    let Ok(req) = req else { return false };
    let Ok(res) = Service::<http::Request<AxumBody>>::call(&mut app, req).await;
    // The cachefence arms' answers must be hits (`naive` has no header).
    let ok =
        res.status() == StatusCode::OK && res.headers().get("x-cache").is_none_or(|v| v == "HIT");
    match res.into_body().collect().await {
        Ok(body) => ok && body.to_bytes().len() == 4 * 1024,
        Err(_) => false,
    }
}

async fn drive(app: &Router, n: usize, conc: usize) -> usize {
    let mut running = FuturesUnordered::new();
    let mut ok = 0;
    for i in 0..n {
        if running.len() >= conc
            && let Some(done) = running.next().await
        {
            ok += usize::from(done);
        }
        running.push(get_one(app.clone(), i));
    }
    while let Some(done) = running.next().await {
        ok += usize::from(done);
    }
    ok
}

fn main() -> Result<(), Error> {
    // Test runners list a `harness = false` target's tests with `--list`
    // (nextest on `--all-targets`): there are none; nothing runs.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let mut arms = vec!["naive".to_owned(), "fence".to_owned()];
    let (mut hits, mut warm, mut conc) = (20_000usize, 1_000usize, 8usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--arms" => arms = value()?.split(',').map(str::to_owned).collect(),
            "--hits" => hits = value()?.parse()?,
            "--warm" => warm = value()?.parse()?,
            "--conc" => conc = value()?.parse::<usize>()?.max(1),
            _ => {}
        }
    }
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let client = redis::Client::open(url.as_str())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for arm in &arms {
            let app = app(arm, &client).await?;
            // The entries are stored, then read (warm-up).
            drive(&app, 10, 1).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            drive(&app, warm, conc).await;
            let started = Instant::now();
            let ok = drive(&app, hits, conc).await;
            let took = started.elapsed();
            println!(
                "{arm}: {hits} hits ({ok} ok) in {:.3} s, {:.2} µs/hit (wall, one thread)",
                took.as_secs_f64(),
                took.as_secs_f64() * 1e6 / hits.max(1) as f64
            );
            if ok != hits {
                return Err::<(), Error>(format!("{arm}: {} hits failed", hits - ok).into());
            }
        }
        Ok(())
    })
}
