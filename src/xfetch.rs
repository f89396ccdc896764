//! The XFetch early-refresh decision (Vattani, Chierichetti, Lowenstein,
//! "Optimal Probabilistic Cache Stampede Prevention", VLDB 2015).

/// Whether a read at `now_ms` of an entry fresh until `expiry_ms`, whose
/// last fill took `delta_ms`, should refresh it early:
/// `now - delta * beta * ln(r) >= expiry` with `r` uniform in (0, 1].
///
/// `beta = 0` (or a zero `delta`) never refreshes before expiry; a larger
/// `beta` refreshes earlier. The random number is an argument so that the
/// function stays pure and testable.
pub(crate) fn should_refresh(
    now_ms: u64,
    expiry_ms: u64,
    delta_ms: u64,
    beta: f64,
    r: f64,
) -> bool {
    if now_ms >= expiry_ms {
        return true;
    }
    if beta.is_nan() || beta <= 0.0 || delta_ms == 0 || r.is_nan() || r <= 0.0 {
        // beta of 0 or NaN turns it off; r is never 0 from `random01`, but a
        // zero would make ln(r) infinite.
        return false;
    }
    let gap = -(delta_ms as f64) * beta * r.min(1.0).ln();
    gap >= (expiry_ms - now_ms) as f64
}

/// A random number uniform in (0, 1].
pub(crate) fn random01() -> f64 {
    1.0 - rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probability(now: u64, expiry: u64, delta: u64, beta: f64) -> f64 {
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| should_refresh(now, expiry, delta, beta, random01()))
            .count();
        hits as f64 / n as f64
    }

    #[test]
    fn beta_zero_never_refreshes_early() {
        assert!(!should_refresh(999, 1_000, 1_000_000, 0.0, 1e-300));
        assert!(should_refresh(1_000, 1_000, 10, 0.0, 0.5));
    }

    #[test]
    fn expired_entries_always_refresh() {
        assert!(should_refresh(2_000, 1_000, 0, 1.0, 1.0));
    }

    #[test]
    fn refresh_probability_rises_toward_one_as_expiry_nears() {
        // delta 100 ms, beta 1: P(refresh) = exp(-remaining / 100).
        let far = probability(0, 1_000, 100, 1.0);
        let mid = probability(800, 1_000, 100, 1.0);
        let near = probability(990, 1_000, 100, 1.0);
        assert!(far < 0.01, "far {far}");
        assert!((mid - (-2.0f64).exp()).abs() < 0.03, "mid {mid}");
        assert!(near > 0.85, "near {near}");
        assert!(far < mid && mid < near);
    }

    #[test]
    fn a_longer_fill_refreshes_earlier() {
        let short = probability(500, 1_000, 100, 1.0);
        let long = probability(500, 1_000, 1_000, 1.0);
        assert!(long > short + 0.3, "short {short}, long {long}");
    }

    #[test]
    fn a_larger_beta_refreshes_earlier() {
        let low = probability(500, 1_000, 200, 0.5);
        let high = probability(500, 1_000, 200, 2.0);
        assert!(high > low + 0.2, "low {low}, high {high}");
    }
}
