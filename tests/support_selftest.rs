//! Self-tests for the shared test support code in `tests/support`.

mod support;

use std::time::Duration;

use support::RedisServer;

#[tokio::test]
async fn server_answers_ping_via_connection_manager() {
    let server = RedisServer::new();
    let mut con = server.connection_manager().await;
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );

    let mut mx = server.multiplexed().await;
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut mx)
        .await
        .unwrap();
    assert_eq!(server.cli(&["GET", "k"]), "v");
    assert_eq!(server.cli(&["GET", "missing"]), "(nil)");
    assert_eq!(server.cli(&["SET", "n", "1"]), "OK");
    assert_eq!(server.cli(&["INCR", "n"]), "2");
}

#[tokio::test]
async fn stop_and_start_on_same_port() {
    let mut server = RedisServer::new();
    let port = server.port();
    server.cli(&["SET", "k", "v"]);

    server.stop();
    assert!(!server.is_running());
    assert!(server.try_cli(&["PING"]).is_err());

    let mut con = server.connection_manager_lazy();
    let res: redis::RedisResult<String> = tokio::time::timeout(
        Duration::from_secs(10),
        redis::cmd("PING").query_async(&mut con),
    )
    .await
    .expect("connection manager must fail fast against a stopped server");
    assert!(res.is_err());

    server.start();
    assert_eq!(server.port(), port);
    assert_eq!(server.cli(&["PING"]), "PONG");
    // No persistence: the data is gone after a restart.
    assert_eq!(server.cli(&["GET", "k"]), "(nil)");
}

#[tokio::test]
async fn pause_makes_commands_time_out_and_resume_recovers() {
    let server = RedisServer::new();
    let mut con = server.connection_manager().await;
    server.pause();
    let res: redis::RedisResult<String> = tokio::time::timeout(
        Duration::from_secs(10),
        redis::cmd("PING").query_async(&mut con),
    )
    .await
    .expect("response timeout must trigger against a paused server");
    assert!(res.is_err());
    server.resume();
    assert_eq!(server.cli(&["PING"]), "PONG");
}

#[tokio::test]
async fn command_count_counts_hgetall() {
    let server = RedisServer::with_args(&["--maxmemory", "1mb"]);
    assert_eq!(
        server.cli(&["CONFIG", "GET", "maxmemory"]),
        "maxmemory\n1048576"
    );
    server.reset_stats();
    assert_eq!(server.command_count("hgetall"), 0);
    assert_eq!(server.total_commands(), 0);

    let mut con = server.connection_manager().await;
    let _: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("h")
        .query_async(&mut con)
        .await
        .unwrap();
    server.cli(&["HGETALL", "h"]);
    assert_eq!(server.command_count("hgetall"), 2);
    assert_eq!(server.command_count("HGETALL"), 2);
    assert_eq!(server.command_count("hset"), 0);
    assert_eq!(server.total_commands(), 2);

    server.reset_stats();
    assert_eq!(server.command_count("hgetall"), 0);
}

#[tokio::test]
async fn http_helper_round_trip() {
    let app = axum::Router::new().route(
        "/hello",
        axum::routing::get(|| async { ([("x-cache", "MISS")], "hi") }),
    );
    let addr = support::serve(app).await;
    let reply = support::Http::new().get(addr, "/hello?x=1").await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_eq!(reply.cache_status(), Some("MISS"));
    assert_eq!(reply.body, "hi");
}

#[tokio::test]
async fn the_server_on_the_port_is_the_one_started_by_its_process_id() {
    let mut server = RedisServer::new();
    assert_eq!(server.reported_pid(), server.pid());
    let first = server.pid();
    server.stop();
    assert_eq!(server.reported_pid(), None);
    server.start();
    assert_eq!(server.reported_pid(), server.pid());
    assert_ne!(server.pid(), first);
}

#[tokio::test]
async fn starting_on_a_port_another_server_answers_fails_instead_of_using_it() {
    // Another redis-server takes the port while ours is stopped: PING is
    // answered, but by the wrong process, so start() must refuse it.
    let mut b = RedisServer::new();
    b.stop();
    let squatter = std::process::Command::new("redis-server")
        .args(["--port", &b.port().to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn the squatter");
    let mut squatter = scopeguard(squatter);
    let client = b.client();
    for _ in 0..200 {
        if client
            .get_connection_with_timeout(Duration::from_millis(100))
            .is_ok()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.start()));
    assert!(
        refused.is_err(),
        "start() accepted another process's server"
    );
    assert_eq!(b.reported_pid(), Some(squatter.0.id()));
    squatter.kill();
}

/// Kills the child on drop.
struct Guard(std::process::Child);
impl Guard {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}
fn scopeguard(child: std::process::Child) -> Guard {
    Guard(child)
}

#[tokio::test]
async fn a_gate_reports_calls_and_holds_them_until_released() {
    use support::gate::Gate;
    let gate = Gate::new();
    let held = tokio::spawn({
        let gate = gate.clone();
        async move { gate.enter().await }
    });
    gate.called(1).await;
    assert!(!held.is_finished());
    gate.release();
    assert_eq!(held.await.unwrap(), 1);
    assert_eq!(gate.enter().await, 2);
}
