//! Parsing stream replies into entries, in RESP2 and RESP3, and entries
//! of the dead-letter stream into [`DeadLetter`]s.

use redis::Value;

use super::FIELD;
use crate::handle::Invalidation;

/// A message that could not be applied, as stored in the dead-letter
/// stream.
///
/// ```no_run
/// # async fn doc(queue: cachefence::queue::InvalidationQueue<redis::aio::ConnectionManager>) -> Result<(), cachefence::FenceError> {
/// use cachefence::Invalidation;
/// for dead in queue.dead_letters(100).await? {
///     let inv = dead.payload.as_deref().and_then(Invalidation::decode);
///     println!("{} ({:?}): {}", dead.source_id, inv, dead.error);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The id of the dead letter in the dead-letter stream.
    pub id: String,
    /// The id the message had in the queue's stream.
    pub source_id: String,
    /// The `inv` field of the message (the encoded invalidation), if it had
    /// one.
    pub payload: Option<String>,
    /// The error of the last attempt.
    pub error: String,
    /// How many times it was attempted.
    pub attempts: u64,
    /// The worker that gave up on it.
    pub consumer: String,
}

impl DeadLetter {
    pub(super) fn from_entry(entry: Entry) -> Self {
        // The dead-letter fields come last: take the last occurrence.
        let last = |name: &str| {
            entry
                .fields
                .iter()
                .rev()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        Self {
            source_id: last("source_id").unwrap_or_default(),
            payload: entry.payload().map(str::to_owned),
            error: last("error").unwrap_or_default(),
            attempts: last("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            consumer: last("consumer").unwrap_or_default(),
            id: entry.id,
        }
    }
}

/// A stream entry: its id and its fields.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    pub(super) fn payload(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == FIELD.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub(super) fn invalidation(&self) -> Result<Invalidation, String> {
        let Some(text) = self.payload() else {
            return Err(format!("undecodable queue entry: no UTF-8 `{FIELD}` field"));
        };
        Invalidation::decode(text).ok_or_else(|| {
            let shown: String = text.chars().take(200).collect();
            format!("undecodable queue entry: {shown:?} is not an invalidation")
        })
    }
}

pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// The entries of an XRANGE / XAUTOCLAIM list: `[[id, [field, value, ...]], ...]`.
/// Entries deleted while pending (fields nil) come with no fields.
pub(super) fn parse_entries(value: Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let mut parts = parts.into_iter();
            let id = parts.next().as_ref().and_then(text)?;
            let fields = match parts.next() {
                Some(Value::Array(flat)) => {
                    let mut fields = Vec::with_capacity(flat.len() / 2);
                    let mut flat = flat.into_iter();
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        fields.push((bytes(k).unwrap_or_default(), bytes(v).unwrap_or_default()));
                    }
                    fields
                }
                Some(Value::Map(pairs)) => pairs
                    .into_iter()
                    .map(|(k, v)| (bytes(k).unwrap_or_default(), bytes(v).unwrap_or_default()))
                    .collect(),
                _ => Vec::new(),
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// The entries of an XREADGROUP reply for one stream: nil on timeout,
/// `[[stream, entries]]` in RESP2, `{stream: entries}` in RESP3.
pub(super) fn parse_read(value: Value) -> Vec<Entry> {
    match value {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => parse_entries(pair.swap_remove(1)),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams
            .into_iter()
            .flat_map(|(_, entries)| parse_entries(entries))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_in_both_protocols() {
        let entry = |id: &str, f: &str, v: &str| {
            Value::Array(vec![
                Value::BulkString(id.into()),
                Value::Array(vec![
                    Value::BulkString(f.into()),
                    Value::BulkString(v.into()),
                ]),
            ])
        };
        let entries = Value::Array(vec![entry("1-0", "inv", "path:/a"), entry("2-0", "x", "y")]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            entries.clone(),
        ])]);
        let resp3 = Value::Map(vec![(Value::BulkString(b"s".to_vec()), entries)]);
        for reply in [resp2, resp3] {
            let got = parse_read(reply);
            assert_eq!(got.len(), 2);
            assert_eq!(got[0].invalidation(), Ok(Invalidation::path("/a")));
            assert!(got[1].invalidation().is_err());
        }
        assert!(parse_read(Value::Nil).is_empty());
        // A deleted entry in a pending list has nil fields.
        let deleted = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"3-0".to_vec()),
            Value::Nil,
        ])]);
        let got = parse_entries(deleted);
        assert_eq!(got[0].id, "3-0");
        assert!(got[0].invalidation().is_err());
    }
}
