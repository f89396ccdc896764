//! Where a worker's blocking reads go on a Redis Cluster: the primary that
//! owns the queue's slot (the `{q}` hash tag), found with `CLUSTER SLOTS`
//! over the queue's connection, followed on `MOVED`, and looked up again
//! whenever the read connection fails (a failover).
//!
//! The worker's `redis::Client` is the template for the node connections:
//! its credentials, database, protocol and TLS settings are kept, only the
//! address changes.

use redis::{Client, ConnectionAddr, Value};

use crate::error::FenceError;

/// The Redis Cluster slot of `key` (see `crate::keep::slot`).
pub(super) fn slot(key: &[u8]) -> u16 {
    crate::keep::slot(key)
}

/// The primary serving `slot` in a `CLUSTER SLOTS` reply.
pub(super) fn owner(reply: &Value, slot: u16) -> Option<(String, u16)> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    ranges.iter().find_map(|range| {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        if !(*start..=*end).contains(&i64::from(slot)) {
            return None;
        }
        let host = primary.first().and_then(text)?;
        let port = match primary.get(1) {
            Some(Value::Int(p)) => u16::try_from(*p).ok()?,
            _ => return None,
        };
        Some((host, port))
    })
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `host:port` (a `MOVED` reply's address; IPv6 hosts hold colons).
pub(super) fn parse_address(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

/// A client for `host:port` with `template`'s settings (TLS kept).
pub(super) fn client_for(template: &Client, host: String, port: u16) -> Result<Client, FenceError> {
    let info = template.get_connection_info().clone();
    let addr = match info.addr().clone() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            tls_params,
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    Ok(Client::open(info.set_addr(addr))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"ns|#queue:{q}"), slot(b"q"));
        assert_eq!(slot(b"ns|#queue:{q}:dead"), slot(b"other|#queue:{q}"));
    }

    #[test]
    fn the_owner_of_a_slot_is_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("10.0.0.2", 7001),
            ]),
        ]);
        assert_eq!(owner(&reply, 0), Some(("10.0.0.1".to_owned(), 7000)));
        assert_eq!(owner(&reply, 5461), Some(("10.0.0.2".to_owned(), 7001)));
        assert_eq!(owner(&Value::Nil, 1), None);
        assert_eq!(
            parse_address("127.0.0.1:7002"),
            Some(("127.0.0.1".to_owned(), 7002))
        );
        assert_eq!(parse_address("[::1]:7002"), Some(("::1".to_owned(), 7002)));
        assert_eq!(parse_address("nope"), None);
    }

    #[test]
    fn a_node_client_keeps_the_template_s_settings() {
        let template = Client::open("redis://user:secret@127.0.0.1:6379/3").unwrap();
        let client = client_for(&template, "10.1.2.3".to_owned(), 7005).unwrap();
        let info = client.get_connection_info();
        assert_eq!(
            info.addr(),
            &ConnectionAddr::Tcp("10.1.2.3".to_owned(), 7005)
        );
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.redis_settings().username(), Some("user"));
    }
}
