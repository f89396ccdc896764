//! Request header normalisation before keying, so that responses that
//! `Vary` on a header don't multiply per spelling of it.
//!
//! `Accept-Encoding` is reduced to the one coding the client prefers among
//! `zstd`, `br`, `gzip` (else `identity`), and the origin is asked with that
//! value, so the response it stores is exactly the one every request with
//! the same normalised value may be served. Users add their own normalisers
//! for other headers ([`FenceLayer::normalize_header`](crate::FenceLayer::normalize_header)).

use std::fmt;
use std::sync::Arc;

use http::header::{ACCEPT_ENCODING, ACCEPT_LANGUAGE};
use http::{HeaderMap, HeaderName, HeaderValue};

/// A user's normaliser of one request header: its (joined) value in, the
/// value to use out, `None` to remove the header.
pub(crate) type NormalizeFn = Arc<dyn Fn(&HeaderValue) -> Option<HeaderValue> + Send + Sync>;

/// The normalisers of a layer.
#[derive(Clone)]
pub(crate) struct Normalizers {
    pub(crate) accept_encoding: bool,
    /// `None`: on in RFC 9111 mode only.
    pub(crate) accept_language: Option<bool>,
    pub(crate) custom: Vec<(HeaderName, NormalizeFn)>,
}

impl Default for Normalizers {
    fn default() -> Self {
        Self {
            accept_encoding: true,
            accept_language: None,
            custom: Vec::new(),
        }
    }
}

impl fmt::Debug for Normalizers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Normalizers")
            .field("accept_encoding", &self.accept_encoding)
            .field("accept_language", &self.accept_language)
            .field(
                "custom",
                &self.custom.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Normalizers {
    /// Normalises the headers of a request on its way through the cache
    /// (`rfc9111`: the layer is in RFC 9111 mode).
    pub(crate) fn apply(&self, headers: &mut HeaderMap, rfc9111: bool) {
        if self.accept_encoding && headers.contains_key(ACCEPT_ENCODING) {
            let value = accept_encoding(&crate::key::header_value(headers, &ACCEPT_ENCODING));
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(value));
        }
        if self.accept_language.unwrap_or(rfc9111) && headers.contains_key(ACCEPT_LANGUAGE) {
            let value = accept_language(&crate::key::header_value(headers, &ACCEPT_LANGUAGE));
            match HeaderValue::from_bytes(&value) {
                Ok(value) if !value.is_empty() => {
                    headers.insert(ACCEPT_LANGUAGE, value);
                }
                _ => {
                    headers.remove(ACCEPT_LANGUAGE);
                }
            }
        }
        for (name, normalize) in &self.custom {
            if !headers.contains_key(name) {
                continue;
            }
            let joined = crate::key::header_value(headers, name);
            let Ok(joined) = HeaderValue::from_bytes(&joined) else {
                continue;
            };
            match normalize(&joined) {
                Some(value) => {
                    headers.insert(name.clone(), value);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
    }
}

/// `Accept-Language` in one spelling (RFC 9110 §12.5.4): tags lowercased,
/// weights in thousandths written `q=0.5` (none for 1), sorted by weight
/// (highest first) then tag, duplicates keeping their highest weight,
/// malformed items dropped. Items of weight 0 are kept (they exclude).
fn accept_language(value: &[u8]) -> Vec<u8> {
    let mut items: Vec<(u16, Vec<u8>)> = Vec::new();
    for item in value.split(|&b| b == b',') {
        let mut params = item.split(|&b| b == b';');
        let tag = params.next().unwrap_or_default().trim_ascii();
        let valid = !tag.is_empty()
            && tag
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*');
        if !valid {
            continue;
        }
        let mut q = Some(1000);
        for param in params {
            let param = param.trim_ascii();
            match param.iter().position(|&b| b == b'=') {
                Some(i) if param[..i].trim_ascii().eq_ignore_ascii_case(b"q") => {
                    q = qvalue(&param[i + 1..]);
                }
                _ => q = None,
            }
        }
        let Some(q) = q else { continue };
        let tag = tag.to_ascii_lowercase();
        match items.iter_mut().find(|(_, t)| *t == tag) {
            Some(found) => found.0 = found.0.max(q),
            None => items.push((q, tag)),
        }
    }
    items.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut out = Vec::new();
    for (q, tag) in items {
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(&tag);
        if q < 1000 {
            let digits = format!("{q:03}");
            out.extend_from_slice(b";q=0.");
            out.extend_from_slice(digits.trim_end_matches('0').as_bytes());
            if q == 0 {
                out.push(b'0');
            }
        }
    }
    out
}

/// The codings chosen from, in the order that breaks ties.
const CODINGS: [&str; 3] = ["zstd", "br", "gzip"];

/// The coding a client prefers among [`CODINGS`] by its q-values (RFC 9110
/// §12.5.3), ties going to the smaller; `identity` when none is acceptable.
fn accept_encoding(value: &[u8]) -> &'static str {
    let mut explicit = [None::<u16>; 3];
    let mut star = None::<u16>;
    for item in value.split(|&b| b == b',') {
        let mut params = item.split(|&b| b == b';');
        let coding = params.next().unwrap_or_default().trim_ascii();
        let mut q = Some(1000);
        for param in params {
            let param = param.trim_ascii();
            if let Some(v) = param
                .strip_prefix(b"q=")
                .or_else(|| param.strip_prefix(b"Q="))
            {
                q = qvalue(v);
            }
        }
        // A malformed weight drops the item.
        let Some(q) = q else { continue };
        if coding == b"*" {
            star = Some(q);
        }
        for (i, name) in CODINGS.iter().enumerate() {
            let alias = i == 2 && coding.eq_ignore_ascii_case(b"x-gzip");
            if coding.eq_ignore_ascii_case(name.as_bytes()) || alias {
                explicit[i] = Some(explicit[i].map_or(q, |e: u16| e.max(q)));
            }
        }
    }
    let mut best = ("identity", 0);
    for (i, name) in CODINGS.iter().enumerate() {
        let q = explicit[i].or(star).unwrap_or(0);
        if q > best.1 {
            best = (name, q);
        }
    }
    best.0
}

/// A qvalue in thousandths: `0`, `1`, `0.5`, `1.000`; `None` if malformed.
fn qvalue(v: &[u8]) -> Option<u16> {
    let v = v.trim_ascii();
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    if frac.len() > 3 || !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut thousandths = 0u16;
    for i in 0..3 {
        thousandths = thousandths * 10 + frac.get(i).map_or(0, |d| u16::from(d - b'0'));
    }
    match int {
        b"0" => Some(thousandths),
        b"1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_language_has_one_spelling() {
        let n = |v: &str| String::from_utf8(accept_language(v.as_bytes())).unwrap();
        let one = "en-us, fr;q=0.5";
        for v in [
            "en-US, fr;q=0.5",
            "fr;q=0.5, en-US",
            "EN-us,fr; q=0.50",
            " fr ; Q=0.500 ,, en-US;q=1",
            "en-US, fr;q=0.5, en-us;q=0.3",
        ] {
            assert_eq!(n(v), one, "{v}");
        }
        assert_eq!(n("de, fr, *;q=0.05, x;q=0"), "de, fr, *;q=0.05, x;q=0.0");
        assert_eq!(n("en;q=2, fr;lvl=1, é"), "");
    }

    #[test]
    fn accept_encoding_is_reduced_to_the_preferred_coding() {
        let n = |v: &str| accept_encoding(v.as_bytes());
        assert_eq!(n("gzip, deflate, br"), "br");
        assert_eq!(n("gzip, deflate, br, zstd"), "zstd");
        assert_eq!(n("br;q=0.9, gzip"), "gzip");
        assert_eq!(n("zstd;q=0.5, br;q=0.9"), "br");
        assert_eq!(n("GZIP"), "gzip");
        assert_eq!(n("x-gzip"), "gzip");
        assert_eq!(n("deflate"), "identity");
        assert_eq!(n("identity"), "identity");
        assert_eq!(n(""), "identity");
        assert_eq!(n("*"), "zstd");
        assert_eq!(n("*;q=0.1, br;q=0"), "zstd");
        assert_eq!(n("gzip;q=0, *;q=0"), "identity");
        assert_eq!(n("br;q=2, gzip;q=0.001"), "gzip");
        assert_eq!(n("br;q=abc"), "identity");
        assert_eq!(n("br ; q=0.5 , gzip ; q=0.4"), "br");
    }

    #[test]
    fn custom_normalisers_rewrite_or_remove_their_header() {
        let mut n = Normalizers::default();
        n.custom.push((
            HeaderName::from_static("accept-language"),
            Arc::new(|v: &HeaderValue| {
                let v = v.to_str().ok()?;
                v.starts_with("de").then(|| HeaderValue::from_static("de"))
            }),
        ));
        let mut h = HeaderMap::new();
        h.insert(
            "accept-language",
            HeaderValue::from_static("de-CH, en;q=0.5"),
        );
        h.insert("accept-encoding", HeaderValue::from_static("gzip, br"));
        n.apply(&mut h, false);
        assert_eq!(h["accept-language"], "de");
        assert_eq!(h["accept-encoding"], "br");
        h.insert("accept-language", HeaderValue::from_static("fr"));
        n.apply(&mut h, false);
        assert!(!h.contains_key("accept-language"));
    }
}
