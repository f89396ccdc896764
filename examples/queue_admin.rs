//! An operator's tool for the invalidation queue of a running deployment:
//! see its lag and act on its dead letters.
//!
//! ```text
//! cargo run --example queue_admin -- [--namespace NS] [--group G] COMMAND
//!
//!   stats              depth, oldest age, consumers, counters
//!   list [N]           the N oldest dead letters (default 20)
//!   replay [ID...]     put these dead letters (or all of them) back on the queue
//!   purge ID...        delete these dead letters
//!   purge --all        delete every dead letter
//! ```
//!
//! Talks to `REDIS_URL` (default `redis://127.0.0.1:6379/`). The namespace
//! is the one the application gives `FenceLayer::namespace` (default
//! `cachefence:`), the group the workers' (default `cachefence`).
//! Exits with status 2 when `stats` finds dead letters or a queue whose
//! oldest invalidation waits longer than `--sla SECS` (default 30), so it
//! can serve as a probe.

use std::process::ExitCode;
use std::time::Duration;

use cachefence::FenceLayer;
use cachefence::queue::InvalidationQueue;
use redis::aio::ConnectionManager;

const USAGE: &str = "usage: queue_admin [--namespace NS] [--group G] [--sla SECS] \
    (stats | list [N] | replay [ID...] | purge ID... | purge --all)";

struct Args {
    namespace: String,
    group: String,
    sla: Duration,
    command: Vec<String>,
}

fn parse(mut raw: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        namespace: "cachefence:".to_owned(),
        group: "cachefence".to_owned(),
        sla: Duration::from_secs(30),
        command: Vec::new(),
    };
    while let Some(arg) = raw.next() {
        let mut value = |name: &str| raw.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--namespace" => args.namespace = value("--namespace")?,
            "--group" => args.group = value("--group")?,
            "--sla" => {
                let secs: f64 = value("--sla")?
                    .parse()
                    .map_err(|_| "--sla takes seconds".to_owned())?;
                args.sla = Duration::try_from_secs_f64(secs)
                    .map_err(|_| "--sla takes seconds".to_owned())?;
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            _ => {
                args.command.push(arg);
                args.command.extend(raw.by_ref());
            }
        }
    }
    if args.command.is_empty() {
        return Err(USAGE.to_owned());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(64);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("queue_admin: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let conn = redis::Client::open(url.as_str())?
        .get_connection_manager()
        .await?;
    let queue = FenceLayer::new(conn)
        .namespace(args.namespace)
        .handle()
        .queue()
        .group(args.group);
    let command: Vec<&str> = args.command.iter().map(String::as_str).collect();
    match command.as_slice() {
        ["stats"] => return stats(&queue, args.sla).await,
        ["list"] => list(&queue, 20).await?,
        ["list", n] => list(&queue, n.parse().map_err(|_| USAGE)?).await?,
        ["replay"] => {
            let ids = queue.replay_dead_letters(usize::MAX).await?;
            println!("replayed {} dead letters", ids.len());
        }
        ["replay", ids @ ..] => {
            for id in ids {
                match queue.replay_dead_letter(id).await? {
                    Some(new) => println!("{id}: queued again as {new}"),
                    None => println!("{id}: no such dead letter"),
                }
            }
        }
        ["purge", "--all"] => {
            println!(
                "purged {} dead letters",
                queue.purge_all_dead_letters().await?
            );
        }
        ["purge", ids @ ..] if !ids.is_empty() => {
            let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
            println!(
                "purged {} dead letters",
                queue.purge_dead_letters(&ids).await?
            );
        }
        _ => {
            eprintln!("{USAGE}");
            return Ok(ExitCode::from(64));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn stats(
    queue: &InvalidationQueue<ConnectionManager>,
    sla: Duration,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let s = queue.stats().await?;
    println!("stream        {}", queue.stream_key());
    println!(
        "depth         {} ({} in workers' hands)",
        s.depth, s.pending
    );
    println!(
        "oldest        {}",
        s.oldest_age.map_or("-".to_owned(), |a| format!("{a:?}"))
    );
    println!("dead letters  {}", s.dead_letters);
    println!(
        "counters      applied {} retried {} dead-lettered {} reclaimed {} replayed {}",
        s.applied, s.retried, s.dead_lettered, s.reclaimed, s.replayed
    );
    if !s.group_exists {
        println!("group         missing: no worker has started");
    }
    for c in &s.consumers {
        println!(
            "consumer      {} pending {} idle {:?}",
            c.name, c.pending, c.idle
        );
    }
    let lagging = s.oldest_age.is_some_and(|age| age > sla);
    if lagging {
        println!("ALERT: the oldest invalidation waits longer than {sla:?}");
    }
    if s.dead_letters > 0 {
        println!(
            "ALERT: {} dead letters (`list`, then `replay` or `purge`)",
            s.dead_letters
        );
    }
    Ok(if lagging || s.dead_letters > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

async fn list(
    queue: &InvalidationQueue<ConnectionManager>,
    limit: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let dead = queue.dead_letters(limit).await?;
    if dead.is_empty() {
        println!("no dead letters");
    }
    for d in dead {
        println!(
            "{}  {}  attempts {}  by {}  error: {}",
            d.id,
            d.payload.as_deref().unwrap_or("(no payload)"),
            d.attempts,
            d.consumer,
            d.error
        );
    }
    Ok(())
}
