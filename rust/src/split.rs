//! Weighted sticky traffic splits: a stable 64-bit hash of the split's name and a sticky key picks
//! a bucket in [0, 1), and cumulative weights pick the variant. The hash is fixed by this file
//! ("fastroute-split-v1", below) and seeded by nothing else, so the same key lands on the same
//! variant in every process and every release that keeps the algorithm. This module must never use
//! a randomly seeded hasher or any state that changes between calls.

/// Where a split reads its sticky key, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// A request header, by the router's header slot.
    Header(usize),
    /// The resolved tenant's name.
    Tenant,
    /// The body's `user` field.
    User,
}

/// The compiled split: variant thresholds on the 53-bit bucket scale.
#[derive(Debug, Clone)]
pub struct Split {
    /// Split name (part of the hash, so splits bucket independently).
    pub name: Box<str>,
    /// Sticky sources, first present wins; none present: the body bytes.
    pub sticky: Vec<Sticky>,
    /// Upper bucket bound of each variant (cumulative weights scaled to 2^53); last is 2^53.
    bounds: Vec<u64>,
}

const SCALE: u64 = 1 << 53;

impl Split {
    /// Build from variant weights (each > 0, checked by the caller). Compile time only.
    #[must_use]
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "weights are positive and scaled into 0..=2^53"
    )]
    pub fn new(name: &str, sticky: Vec<Sticky>, weights: &[f64]) -> Self {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut bounds: Vec<u64> = weights
            .iter()
            .map(|w| {
                acc += w;
                ((acc / total) * SCALE as f64).round() as u64
            })
            .collect();
        if let Some(last) = bounds.last_mut() {
            *last = SCALE;
        }
        Self {
            name: name.into(),
            sticky,
            bounds,
        }
    }

    /// The bucket of `key` in [0, 1) for this split. One hash of the key.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "53-bit value is exact in f64")]
    pub fn bucket(&self, key: &[u8]) -> f64 {
        (self.raw_bucket(key) as f64) / (SCALE as f64)
    }

    #[inline]
    fn raw_bucket(&self, key: &[u8]) -> u64 {
        hash(self.name.as_bytes(), key) >> 11
    }

    /// The variant index for `key`, and its bucket. A hash and a scan of the (few) bounds.
    #[must_use]
    pub fn pick(&self, key: &[u8]) -> (usize, f64) {
        let raw = self.raw_bucket(key);
        let idx = self
            .bounds
            .iter()
            .position(|&b| raw < b)
            .unwrap_or(self.bounds.len().saturating_sub(1));
        (idx, self.bucket(key))
    }
}

/// fastroute-split-v1: FNV-1a 64 over `salt`, one 0xFF separator byte (never valid inside UTF-8
/// text, so `("ab","c")` and `("a","bc")` differ), then `key`; finalized by MurmurHash3's fmix64 so
/// that near-identical keys spread over the whole range. Stable by construction: no seed.
#[must_use]
pub fn hash(salt: &[u8], key: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &b in salt.iter().chain(std::iter::once(&0xFF)).chain(key) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The bucket in [0, 1) of `key` under `salt`: the same 53-bit scale `Split` uses, so a key lands
/// where a split with the same name would put it. Run-time experiments call this once per request.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "53-bit value is exact in f64")]
pub fn unit_bucket(salt: &[u8], key: &[u8]) -> f64 {
    ((hash(salt, key) >> 11) as f64) / (SCALE as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_pinned() {
        // Values from an independent reimplementation (tests/test_core_properties.py holds one).
        // Changing them re-buckets every user of every split: add a new version instead.
        assert_eq!(hash(b"ab", b"tenant-a"), 0x427d_a031_4f4b_db12);
        assert_eq!(hash(b"canary", b"42"), 0x07b9_034f_226a_a129);
        assert_eq!(hash(b"", b""), 0x1bbd_5c81_3c69_a8d7);
        assert_ne!(hash(b"ab", b"c"), hash(b"a", b"bc"));
    }

    #[test]
    fn unit_bucket_matches_split_bucket() {
        let s = Split::new("exp", vec![], &[1.0]);
        for k in ["", "u1", "tenant-a"] {
            assert!((unit_bucket(b"exp", k.as_bytes()) - s.bucket(k.as_bytes())).abs() < f64::EPSILON);
        }
    }

    #[test]
    fn shares_follow_weights() {
        let s = Split::new("ab", vec![Sticky::Tenant], &[1.0, 3.0, 6.0]);
        let n = 100_000u32;
        let mut counts = [0u32; 3];
        for i in 0..n {
            counts[s.pick(format!("key-{i}").as_bytes()).0] += 1;
        }
        for (c, w) in counts.iter().zip([0.1, 0.3, 0.6]) {
            let p = f64::from(*c) / f64::from(n);
            // 5 standard deviations of a binomial share at n = 100k is at most 0.0079.
            assert!((p - w).abs() < 0.008, "{counts:?}");
        }
    }

    #[test]
    fn same_key_same_variant_and_bucket_in_range() {
        let s = Split::new("ab", vec![], &[1.0, 1.0]);
        for i in 0..1000 {
            let k = format!("u{i}");
            assert_eq!(s.pick(k.as_bytes()), s.pick(k.as_bytes()));
            let (_, b) = s.pick(k.as_bytes());
            assert!((0.0..1.0).contains(&b));
        }
    }
}
