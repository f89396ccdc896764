//! The keep sets: where the index keys and fences that must not be evicted
//! are listed with the time they would have expired at (see `keep_index!`
//! in src/scripts.rs for the Lua that writes and reaps them).
//!
//! A namespace has one keep set, `<ns>|#keep`, on a single server. On a
//! Redis Cluster a script may only touch keys of one slot, so there is one
//! per hash slot: `<ns>|#keep:{<tag>}`, where `<tag>` is the shortest
//! decimal number whose slot is the slot of the keys it lists (a table
//! built once, the slot computed locally).

use std::sync::OnceLock;

/// Hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// The Redis Cluster slot of `key` (CRC16/XMODEM of its hash tag, or of
/// the whole key without one, modulo 16384).
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % 16384
}

/// CRC16/XMODEM, as Redis Cluster computes it.
pub(crate) fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// For each slot, the smallest number whose decimal text hashes to it.
fn slot_tags() -> &'static [u32] {
    static TAGS: OnceLock<Vec<u32>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; SLOTS];
        let mut missing = SLOTS;
        let mut n: u32 = 0;
        // Every slot is reached below 200,000 (checked by a test).
        while missing > 0 && n < u32::MAX {
            let s = usize::from(crc16(n.to_string().as_bytes()) % 16384);
            if tags[s] == u32::MAX {
                tags[s] = n;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// The keep set listing `key` (an index key or fence of the crate):
/// `<ns>|#keep` on a single server, the keep set of `key`'s slot on a
/// Redis Cluster.
pub(crate) fn keep_of(key: &str, cluster: bool) -> String {
    let ns = key.find('|').map_or("", |end| &key[..=end]);
    if !cluster {
        return format!("{ns}#keep");
    }
    let tag = slot_tags()
        .get(usize::from(slot(key.as_bytes())))
        .copied()
        .unwrap_or(0);
    format!("{ns}#keep:{{{tag}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
    }

    #[test]
    fn every_slot_has_a_keep_set_in_it() {
        let tags = slot_tags();
        assert!(tags.iter().all(|&t| t < 200_000));
        for (s, t) in tags.iter().enumerate() {
            assert_eq!(usize::from(slot(t.to_string().as_bytes())), s);
        }
        let entry = "ns|/a?b=1:{0123456789abcdef0123456789abcdef}:vars";
        let keep = keep_of(entry, true);
        assert!(keep.starts_with("ns|#keep:{"), "{keep}");
        assert_eq!(slot(keep.as_bytes()), slot(entry.as_bytes()));
        assert_eq!(keep_of(entry, false), "ns|#keep");
        assert_eq!(keep_of("ns|#tag:x:{d}:fence", false), "ns|#keep");
    }
}
