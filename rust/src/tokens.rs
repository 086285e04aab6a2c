//! Token estimation for one JSON string's raw content (escapes still escaped): a fast byte-class estimate
//! calibrated against o200k_base, and an exact BPE count when a config asks for it. The fast path is one pass
//! over the bytes through lookup tables; it never allocates, never fails and never reads beyond the slice. The
//! exact path unescapes into a `String` and runs a real BPE built once per process. Pure functions: no I/O, no
//! Python.
//!
//! How the fast estimate works: each byte maps to one of 16 classes (letter case, digit, space, line break,
//! punctuation, UTF-8 continuation, and UTF-8 lead bytes by script block: Latin, other alphabets, symbols, kana,
//! Han, Hangul, other 3-byte, 4-byte/emoji). A token weight is attached to every (previous class, class) pair, so
//! runs — a word start, a digit run, a punctuation run, a camelCase hump, a run of non-ASCII text — cost one table
//! add, with no state machine on the critical path. Between escapes the hot loop reads each pair of adjacent bytes
//! as one `u16` and looks its weight up in a 64Ki-entry table of pair weights by byte (no class lookups). JSON
//! escapes (found a word at a time, or skipped when the scanner saw none) are decoded in place into the class of the
//! character they stand for, so `\u4e2d` and `中` cost the same. The pair weights are [`FEATURES`] indicator
//! features dotted with weights fitted by `tests/fixtures/tokens/calibrate.py` (weighted least squares on relative
//! error against exact o200k_base counts of the corpus in `tests/fixtures/tokens/`).

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

/// How a compiled router counts input tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimator {
    /// Byte-class heuristic calibrated against o200k_base; no allocation, ~1-3 GB/s (see the throughput probe).
    Fast,
    /// A real BPE (o200k_base): exact, allocates, several hundred times slower than `Fast` (~2-3 MB/s).
    ExactO200k,
    /// A real BPE (cl100k_base): exact, allocates, several hundred times slower than `Fast` (~2-3 MB/s).
    ExactCl100k,
}

impl Estimator {
    /// Tokens in `text` (one JSON string's raw content) by this estimator. `Fast` runs on the hot path; the exact
    /// variants build their BPE on first use (about a second, once per process) and then allocate per call.
    #[must_use]
    pub fn count(self, text: &[u8]) -> u32 {
        match self {
            Self::Fast => estimate_fast(text),
            Self::ExactO200k => count_exact(o200k(), text),
            Self::ExactCl100k => count_exact(cl100k(), text),
        }
    }

    /// [`Self::count`] for a string the scanner has read, which knows whether it holds an escape.
    #[inline]
    #[must_use]
    pub fn count_raw(self, text: &[u8], escaped: bool) -> u32 {
        match self {
            Self::Fast => estimate_raw(text, escaped),
            _ => self.count(text),
        }
    }
}

/// Fast estimate of the o200k_base tokens in `text`, the raw content of one JSON string (escapes included).
/// Runs on the hot path: one pass, no allocation; 0 for empty input and at least 1 otherwise.
#[must_use]
pub fn estimate_fast(text: &[u8]) -> u32 {
    estimate_raw(text, true)
}

/// [`estimate_fast`] for a string whose escapes are already known: with `may_escape` false (the scanner saw no
/// backslash) the whole string is one run and no byte is searched for a backslash.
#[must_use]
pub fn estimate_raw(text: &[u8], may_escape: bool) -> u32 {
    if text.is_empty() {
        return 0;
    }
    finish(weight_from(text, may_escape, BREAK, 0))
}

/// A JSON string's plain start, weighed while its end is still unknown ([`plain_prefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// `text[..len]` holds no quote, backslash, control or non-ASCII byte.
    pub len: usize,
    /// The weight of `text[..len]` (as [`estimate_raw`] counts it).
    pub weight: i64,
    /// The string ends at `len`: `text[len]` is its closing quote.
    pub whole: bool,
}

/// A JSON string's plain start, weighed while its end is still unknown: `text[..len]` holds no quote, backslash,
/// control or non-ASCII byte and `weight` is its weight (as [`estimate_raw`] counts it); `len` is a multiple of 32,
/// or the string's length when `whole` (its closing quote lies in the block after the last whole one and only plain
/// bytes come before it), and 0 when no AVX2 or `text` is short. `text` is the body from the string's first byte:
/// the string ends at a quote, so its closing quote lies at `len` or later. Unless the prefix is the whole string,
/// the scanner finds the end from `len` and hands the rest to [`estimate_after`], so a long plain string is read once,
/// not once to find its end and once to weigh it.
#[must_use]
pub fn plain_prefix(text: &[u8]) -> Prefix {
    #[cfg(target_arch = "x86_64")]
    if text.len() >= simd::MIN_RUN && simd::available() {
        let (len, weight, whole) = simd::plain_prefix(text);
        if len > 0 {
            let first = PAIR_WEIGHT[pair_index(usize::from(BREAK), CLASS[usize::from(text[0])])];
            return Prefix {
                len,
                weight: weight + i64::from(first),
                whole,
            };
        }
        return Prefix {
            len: 0,
            weight: 0,
            whole,
        };
    }
    let _ = text;
    Prefix {
        len: 0,
        weight: 0,
        whole: false,
    }
}

/// [`estimate_raw`] of a string whose start `prefix` ([`plain_prefix`] of it) has already weighed: equal to
/// `estimate_raw(text, may_escape)`.
#[must_use]
pub fn estimate_after(text: &[u8], may_escape: bool, prefix: Prefix) -> u32 {
    let Prefix {
        len: n,
        weight: w,
        whole,
    } = prefix;
    if whole && n > 0 {
        return finish(w);
    }
    match n.checked_sub(1).and_then(|last| text.get(last)) {
        // The run the prefix ends inside goes on from `n`: its byte pairs by class equal its pairs by byte.
        Some(&last) => finish(weight_from(&text[n..], may_escape, CLASS[usize::from(last)], w)),
        None => estimate_raw(text, may_escape),
    }
}

/// The rounded token count of a weight sum (at least 1).
#[inline]
fn finish(acc: i64) -> u32 {
    let tokens = (acc + (1 << (SCALE_BITS - 1))) >> SCALE_BITS;
    u32::try_from(tokens.max(1)).unwrap_or(u32::MAX)
}

/// `acc` plus the pair weights of `text`, whose first character follows a character of class `prev`.
#[inline]
fn weight_from(text: &[u8], may_escape: bool, prev: u8, acc: i64) -> i64 {
    // NOTE: text with escapes goes through the vector path block by block, two-byte escapes included; split into
    // the runs between escapes instead, text with an escape every few dozen bytes had runs too short for it.
    #[cfg(target_arch = "x86_64")]
    if may_escape && text.len() >= simd::MIN_RUN && simd::available() {
        return simd::text_weight(text, prev, acc);
    }
    weight_scalar(text, may_escape, prev, acc)
}

/// `acc` plus the pair weights of `text[pos..]` up to `stop` (or past it, to the end of an escape that crosses it),
/// the character at `pos` following one of class `prev`: the position, class and sum reached.
#[inline]
fn weight_until(text: &[u8], pos: usize, stop: usize, prev: u8, acc: i64) -> (usize, u8, i64) {
    let (mut pos, mut prev, mut acc) = (pos, prev, acc);
    let stop = stop.min(text.len());
    while pos < stop {
        let rest = &text[pos..];
        if rest[0] == b'\\' {
            let (class, len) = escape_class(rest);
            acc += i64::from(PAIR_WEIGHT[pair_index(usize::from(prev), class)]);
            prev = class;
            pos += len;
            continue;
        }
        acc += i64::from(PAIR_WEIGHT[pair_index(usize::from(prev), CLASS[usize::from(rest[0])])]);
        let len = find_backslash(&rest[..stop - pos]);
        acc += run_weight_scalar(&rest[..len]);
        prev = CLASS[usize::from(rest[len - 1])];
        pos += len;
    }
    (pos, prev, acc)
}

/// [`weight_from`] run by run between escapes: the reference the vector path over escapes is tested against.
fn weight_scalar(text: &[u8], may_escape: bool, prev: u8, acc: i64) -> i64 {
    let mut acc = acc;
    // The class of the character before `rest` (a decoded escape counts as the character it stands for).
    let mut prev = prev;
    let mut rest = text;
    while let Some(&first) = rest.first() {
        if first == b'\\' {
            let (class, len) = escape_class(rest);
            acc += i64::from(PAIR_WEIGHT[pair_index(usize::from(prev), class)]);
            prev = class;
            rest = rest.get(len..).unwrap_or_default();
            continue;
        }
        // A run of plain bytes up to the next backslash: its first byte pairs with `prev` by class, the rest by
        // byte.
        acc += i64::from(PAIR_WEIGHT[pair_index(usize::from(prev), CLASS[usize::from(first)])]);
        let len = if may_escape { find_backslash(rest) } else { rest.len() };
        acc += run_weight(&rest[..len]);
        prev = CLASS[usize::from(rest[len - 1])];
        rest = &rest[len..];
    }
    acc
}

/// Sum of the pair weights inside `run` (no backslashes): one table load per byte, indexed by the byte and the
/// one before it read together as a `u16`, so no class is looked up and only the sum is carried between iterations.
#[inline]
fn run_weight(run: &[u8]) -> i64 {
    #[cfg(target_arch = "x86_64")]
    if run.len() >= simd::MIN_RUN && simd::available() {
        return simd::run_weight(run);
    }
    run_weight_scalar(run)
}

/// [`run_weight`] one table load per byte: the portable path, and the reference the SIMD path is tested against.
#[inline]
fn run_weight_scalar(run: &[u8]) -> i64 {
    // NOTE: the pairs starting at even offsets, then those at odd ones, each a plain `u16` load: one load, one
    // table load and one add per byte (2x the class-table loop on prose, 1.2x on the escape-heavy mixed corpus).
    // One overlapping window instead carries the previous byte in a register or gets vectorized into shuffles and
    // extracts, 5-10 instructions per byte.
    let Some(odd) = run.get(1..) else { return 0 };
    halves(run) + halves(odd)
}

/// The pair weights of `run`'s non-overlapping pairs (bytes 0 and 1, 2 and 3, ...).
#[inline]
fn halves(run: &[u8]) -> i64 {
    let mut acc = 0i64;
    for p in run.chunks_exact(2) {
        if let Some(&p) = p.first_chunk::<2>() {
            acc += i64::from(BYTE_PAIR_WEIGHT[usize::from(u16::from_le_bytes(p))]);
        }
    }
    acc
}

/// Offset of the first backslash in `text`, or its length.
#[inline]
fn find_backslash(text: &[u8]) -> usize {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const BACKSLASHES: u64 = u64::from_le_bytes([b'\\'; 8]);
    // NOTE: escapes come every few dozen bytes in code and escaped text; a word-at-a-time look at the next 32
    // bytes finds most of them cheaper than a memchr call per escape (mixed corpus ~12% faster).
    for i in (0..32).step_by(8) {
        let Some(w) = text.get(i..).and_then(<[u8]>::first_chunk::<8>) else {
            return i + memchr::memchr(b'\\', &text[i..]).unwrap_or(text.len() - i);
        };
        let x = u64::from_le_bytes(*w) ^ BACKSLASHES;
        let found = x.wrapping_sub(ONES) & !x & HIGHS;
        if found != 0 {
            return i + (found.trailing_zeros() / 8) as usize;
        }
    }
    32 + memchr::memchr(b'\\', &text[32..]).unwrap_or(text.len() - 32)
}

/// The pair weights of a run (or of escaped text) 32 bytes at a time with AVX2 (detected at run time): plain ASCII
/// blocks are classified by comparisons and looked up in a 48-entry pair table by byte shuffles; in escaped text, so
/// are ASCII blocks whose escapes are all two-byte ones; any other block (a non-ASCII byte, a `\u` escape) is summed
/// by the scalar loop. The sum is exactly the scalar one (the tables are `PAIR_WEIGHT`).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_add_epi8, _mm256_adds_epu8, _mm256_alignr_epi8, _mm256_and_si256,
        _mm256_andnot_si256, _mm256_blendv_epi8, _mm256_cmpeq_epi8, _mm256_cmpgt_epi8, _mm256_extract_epi64,
        _mm256_loadu_si256, _mm256_min_epu8, _mm256_movemask_epi8, _mm256_or_si256, _mm256_permute2x128_si256,
        _mm256_sad_epu8, _mm256_set1_epi8, _mm256_setr_epi8, _mm256_setzero_si256, _mm256_shuffle_epi8,
        _mm256_slli_epi16, _mm256_srli_epi16, _mm256_sub_epi8, _mm256_testz_si256, _mm256_xor_si256,
    };

    use super::{
        pair_index, run_weight_scalar, BREAK, BYTE_PAIR_WEIGHT, CLASS, DIGIT, LOWER, PAIR_WEIGHT, PUNCT, SPACE, UPPER,
    };

    /// Shortest run worth the vector setup.
    pub(super) const MIN_RUN: usize = 64;

    /// Whether the CPU has AVX2 (cached by std after the first call).
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
    }

    /// ASCII splits into 10 ranges of one class each (0x00-0x1f, 0x20, 0x21-0x2f, 0x30-0x39, 0x3a-0x40, 0x41-0x5a,
    /// 0x5b-0x60, 0x61-0x7a, 0x7b-0x7e, 0x7f), numbered in order. A byte's range is its row's (high nibble's) first
    /// range, plus one for each of the row's two thresholds its low nibble is above.
    const ROW_BASE: [u8; 16] = [0, 0, 1, 3, 4, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0];
    const ROW_T1: [u8; 16] = [15, 15, 0, 9, 0, 10, 0, 10, 15, 15, 15, 15, 15, 15, 15, 15];
    const ROW_T2: [u8; 16] = [15, 15, 15, 15, 15, 15, 15, 14, 15, 15, 15, 15, 15, 15, 15, 15];
    const RANGE_LOWS: [u8; 10] = [0x00, 0x20, 0x21, 0x30, 0x3a, 0x41, 0x5b, 0x61, 0x7b, 0x7f];

    const fn range_of(b: u8) -> usize {
        let (row, lo) = ((b >> 4) as usize, b & 15);
        ROW_BASE[row] as usize + (lo > ROW_T1[row]) as usize + (lo > ROW_T2[row]) as usize
    }

    /// The class of each range; checked at compile time against `class_of` for every ASCII byte but the backslash
    /// (which never reaches the vector path).
    const RANGE_CLASS: [u8; 10] = {
        let mut t = [0u8; 10];
        let mut i = 0;
        while i < 10 {
            t[i] = super::class_of(RANGE_LOWS[i]);
            assert!(t[i] < 8, "an ASCII class outside 0..8");
            i += 1;
        }
        let mut b = 0u8;
        while b < 0x80 {
            assert!(
                b == b'\\' || t[range_of(b)] == super::class_of(b),
                "the nibble ranges disagree with class_of"
            );
            b += 1;
        }
        t
    };

    /// Byte `k` (0 = low, 1 = high) of `PAIR_WEIGHT` of the ASCII pair at index `prev * 8 + class`, in three
    /// 16-entry tables (indices 0..48).
    const fn pair_table(k: u32) -> [[u8; 16]; 3] {
        let mut t = [[0u8; 16]; 3];
        let mut i = 0;
        while i < 48 {
            let (prev, class) = (i / 8, i % 8);
            let w = if prev < 8 && class < 8 {
                PAIR_WEIGHT[pair_index(prev, class as u8)]
            } else {
                0
            };
            assert!(
                w >= i16::MIN as i32 && w <= i16::MAX as i32,
                "a pair weight does not fit in i16"
            );
            t[i / 16][i % 16] = ((w as i16 as u16) >> (8 * k)) as u8;
            i += 1;
        }
        t
    }
    const LOW: [[u8; 16]; 3] = pair_table(0);
    const HIGH: [[u8; 16]; 3] = pair_table(1);

    /// A 16-byte table in both 128-bit lanes (shuffles work per lane).
    #[target_feature(enable = "avx2")]
    fn table(t: &[u8; 16]) -> __m256i {
        let b = t.map(|x| x as i8);
        _mm256_setr_epi8(
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15], b[0],
            b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15],
        )
    }

    /// The class of every byte of `v` (all ASCII, no backslash), and the class times 8.
    #[target_feature(enable = "avx2")]
    fn classes(v: __m256i, t: &Tables) -> (__m256i, __m256i) {
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), t.nibble);
        let lo = _mm256_and_si256(v, t.nibble);
        let row = |table| _mm256_shuffle_epi8(table, hi);
        // A compare yields -1 where the low nibble is above the threshold; subtracting adds one.
        let range = _mm256_sub_epi8(
            _mm256_sub_epi8(row(t.base), _mm256_cmpgt_epi8(lo, row(t.t1))),
            _mm256_cmpgt_epi8(lo, row(t.t2)),
        );
        (
            _mm256_shuffle_epi8(t.class, range),
            _mm256_shuffle_epi8(t.class8, range),
        )
    }

    /// Every lookup table, loaded into vectors once per call.
    struct Tables {
        nibble: __m256i,
        base: __m256i,
        t1: __m256i,
        t2: __m256i,
        class: __m256i,
        class8: __m256i,
        low: [__m256i; 3],
        high: [__m256i; 3],
    }

    impl Tables {
        #[target_feature(enable = "avx2")]
        fn load() -> Self {
            let mut class_t = [0u8; 16];
            let mut class8_t = [0u8; 16];
            for (i, &c) in RANGE_CLASS.iter().enumerate() {
                class_t[i] = c;
                class8_t[i] = c * 8;
            }
            Self {
                nibble: _mm256_set1_epi8(0x0f),
                base: table(&ROW_BASE),
                t1: table(&ROW_T1),
                t2: table(&ROW_T2),
                class: table(&class_t),
                class8: table(&class8_t),
                low: [table(&LOW[0]), table(&LOW[1]), table(&LOW[2])],
                high: [table(&HIGH[0]), table(&HIGH[1]), table(&HIGH[2])],
            }
        }

        /// The low and high bytes of the weight of each lane's pair index (0..48) in `idx`.
        #[target_feature(enable = "avx2")]
        #[inline]
        fn pair_weights(&self, idx: __m256i) -> (__m256i, __m256i) {
            // Added with unsigned saturation to an index in 0..16, 0x70 keeps its low nibble and its top bit clear;
            // to an index of 16 or more (or one below 0, wrapped), it sets the top bit, which makes a shuffle give 0.
            let in_range = _mm256_set1_epi8(0x70);
            let i0 = _mm256_adds_epu8(idx, in_range);
            let i1 = _mm256_adds_epu8(_mm256_sub_epi8(idx, _mm256_set1_epi8(16)), in_range);
            let i2 = _mm256_adds_epu8(_mm256_sub_epi8(idx, _mm256_set1_epi8(32)), in_range);
            let look = |tables: &[__m256i; 3]| {
                _mm256_or_si256(
                    _mm256_or_si256(_mm256_shuffle_epi8(tables[0], i0), _mm256_shuffle_epi8(tables[1], i1)),
                    _mm256_shuffle_epi8(tables[2], i2),
                )
            };
            (look(&self.low), look(&self.high))
        }
    }

    /// `acc` plus the pair weights of `text` (escapes included), whose first character follows one of class
    /// `prev`: equal to [`super::weight_scalar`].
    pub(super) fn text_weight(text: &[u8], prev: u8, acc: i64) -> i64 {
        debug_assert!(available());
        // SAFETY: AVX2 is present (checked by the caller through `available`).
        unsafe { text_weight_avx2(text, prev, acc) }
    }

    /// Where the escapes of a block without non-ASCII bytes sit, when each is a two-byte one (`\n`, `\"`, `\\`,
    /// ...) ending inside the block: per byte, 0xff at each escape's two bytes (`sel`) and at its second (`second`),
    /// and the class of the character it stands for at both (`class`). None for any other escape.
    #[inline]
    fn simple_escapes(block: &[u8; 32], mut backslashes: u32) -> Option<([u8; 32], [u8; 32], [u8; 32])> {
        let (mut sel, mut second, mut class) = ([0u8; 32], [0u8; 32], [0u8; 32]);
        while backslashes != 0 {
            let k = backslashes.trailing_zeros() as usize;
            let c = match block.get(k + 1)? {
                b'n' | b'r' | b't' | b'b' | b'f' => BREAK,
                b'"' | b'\\' | b'/' => PUNCT,
                _ => return None,
            };
            sel[k] = 0xff;
            sel[k + 1] = 0xff;
            second[k + 1] = 0xff;
            class[k] = c;
            class[k + 1] = c;
            // The escape's second byte may be a backslash itself (`\\`): it starts nothing.
            backslashes &= !(3u32 << k);
        }
        Some((sel, second, class))
    }

    /// [`text_weight`]: 32 bytes at a time; a block holding only ASCII and two-byte escapes goes through the vector
    /// path (each escape's first byte takes the class of the character it stands for, its second byte the same
    /// class and no weight, so the pairs are those of the decoded text), any other block through the scalar loop.
    #[target_feature(enable = "avx2")]
    fn text_weight_avx2(text: &[u8], prev: u8, acc: i64) -> i64 {
        let t = Tables::load();
        let backslash = _mm256_set1_epi8(b'\\' as i8);
        let bias = _mm256_set1_epi8(i8::MIN);
        let zero = _mm256_setzero_si256();
        let low3 = _mm256_set1_epi8(7);
        let (mut sum_lo, mut sum_hi) = (zero, zero);
        let mut vector_blocks = 0i64;
        let (mut acc, mut prev, mut pos) = (acc, prev, 0usize);
        let mut prev8: Option<__m256i> = None;
        while let Some(block) = text.get(pos..).and_then(<[u8]>::first_chunk::<32>) {
            // SAFETY: `block` is 32 readable bytes; the load is unaligned.
            let v = unsafe { _mm256_loadu_si256(block.as_ptr().cast()) };
            let wide = _mm256_movemask_epi8(v);
            let backslashes = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, backslash)).cast_unsigned();
            let escapes = match (wide, backslashes) {
                (0, 0) => None,
                (0, b) => simple_escapes(block, b),
                _ => None,
            };
            if wide != 0 || (backslashes != 0 && escapes.is_none()) {
                (pos, prev, acc) = super::weight_until(text, pos, pos + 32, prev, acc);
                prev8 = None;
                continue;
            }
            let (mut c, mut c8) = classes(v, &t);
            let mut second = zero;
            let mut first_class = CLASS[usize::from(block[0])];
            let mut last_class = CLASS[usize::from(block[31])];
            if let Some((sel, sec, class)) = &escapes {
                // SAFETY: each array is 32 readable bytes; the loads are unaligned.
                let (sel_v, class_v) = unsafe {
                    (
                        _mm256_loadu_si256(sel.as_ptr().cast()),
                        _mm256_loadu_si256(class.as_ptr().cast()),
                    )
                };
                // SAFETY: as above.
                second = unsafe { _mm256_loadu_si256(sec.as_ptr().cast()) };
                c = _mm256_blendv_epi8(c, class_v, sel_v);
                c8 = _mm256_slli_epi16::<3>(_mm256_and_si256(c, low3));
                if sel[0] != 0 {
                    first_class = class[0];
                }
                if sel[31] != 0 {
                    last_class = class[31];
                }
            }
            let before = prev8.unwrap_or(_mm256_set1_epi8((LOWER * 8) as i8));
            let p8 = _mm256_alignr_epi8::<15>(c8, _mm256_permute2x128_si256::<0x21>(before, c8));
            if prev8.is_none() {
                // Lane 0 paired with a stand-in: take it out, and put the real pair in.
                acc -= i64::from(PAIR_WEIGHT[pair_index(usize::from(LOWER), first_class)]);
                acc += i64::from(PAIR_WEIGHT[pair_index(usize::from(prev), first_class)]);
            }
            let idx = _mm256_or_si256(p8, c);
            // An escape's second byte adds nothing (weight 0: both bytes 0).
            let (wl, wh) = t.pair_weights(idx);
            let (wl, wh) = (_mm256_andnot_si256(second, wl), _mm256_andnot_si256(second, wh));
            sum_lo = _mm256_add_epi64(sum_lo, _mm256_sad_epu8(wl, zero));
            sum_hi = _mm256_add_epi64(sum_hi, _mm256_sad_epu8(_mm256_xor_si256(wh, bias), zero));
            vector_blocks += 1;
            prev8 = Some(c8);
            prev = last_class;
            pos += 32;
        }
        if pos < text.len() {
            (_, _, acc) = super::weight_until(text, pos, text.len(), prev, acc);
        }
        let lanes = |v: __m256i| {
            _mm256_extract_epi64::<0>(v)
                + _mm256_extract_epi64::<1>(v)
                + _mm256_extract_epi64::<2>(v)
                + _mm256_extract_epi64::<3>(v)
        };
        acc + lanes(sum_lo) + 256 * (lanes(sum_hi) - 128 * 32 * vector_blocks)
    }

    /// Sum of the pair weights inside `run` (`run.len() >= 32`), equal to [`run_weight_scalar`].
    pub(super) fn run_weight(run: &[u8]) -> i64 {
        debug_assert!(available());
        // SAFETY: AVX2 is present (checked by the caller through `available`).
        unsafe { run_weight_avx2::<false>(run).1 }
    }

    /// The whole 32-byte blocks at the start of `text` that hold no quote, backslash, control or non-ASCII byte,
    /// as their length and the sum of the pair weights inside them; or, when the string ends in the next block after
    /// plain bytes only, all of it, and true.
    pub(super) fn plain_prefix(text: &[u8]) -> (usize, i64, bool) {
        debug_assert!(available());
        // SAFETY: AVX2 is present (checked by the caller through `available`).
        unsafe { run_weight_avx2::<true>(text) }
    }

    // A plain run's bytes, classified by two nibble lookups: the bits a byte's high nibble (row) and its low nibble
    // (column) have in common say its class, or that it is special (a quote, a backslash, a control, DEL or a
    // non-ASCII byte: the block leaves the vector path). The five classes of the other ASCII bytes are numbered
    // `RUN_CLASSES` order, punctuation 0, so a pair of them indexes a 25-entry table: two shuffles per weight byte,
    // where the ten ranges of `classes` and its 48-entry pair table take five shuffles and more compares.
    // The class bits are 4 or more, above every run class number, so that the class of a byte is the smaller of its
    // row's class and its bits (0 for punctuation, which has none).
    /// Row 4 or 6 with a column of 1 or more: `A`..`O`, `a`..`o`.
    const LETTER_FROM_1: u8 = 0x04;
    /// Row 5 or 7 with a column of 10 or less: `P`..`Z`, `p`..`z`.
    const LETTER_TO_10: u8 = 0x08;
    /// Row 3, columns 0..=9: digits.
    const DIGITS: u8 = 0x10;
    /// Row 2, column 0: the space.
    const SPACE_BYTE: u8 = 0x20;
    /// Row 2, column 2: the quote.
    const QUOTE: u8 = 0x01;
    /// Row 5, column 12: the backslash.
    const BACKSLASH: u8 = 0x02;
    /// Rows 0 and 1 (controls) and 8..=15 (non-ASCII), every column.
    const SPECIAL_ROW: u8 = 0x40;
    /// Row 7, column 15: DEL (a control).
    const DEL: u8 = 0x80;
    const SPECIAL: u8 = QUOTE | BACKSLASH | SPECIAL_ROW | DEL;

    const ROWS: [u8; 16] = {
        let mut t = [SPECIAL_ROW; 16];
        t[2] = SPACE_BYTE | QUOTE;
        t[3] = DIGITS;
        t[4] = LETTER_FROM_1;
        t[5] = LETTER_TO_10 | BACKSLASH;
        t[6] = LETTER_FROM_1;
        t[7] = LETTER_TO_10 | DEL;
        t
    };
    const COLUMNS: [u8; 16] = {
        let mut t = [0u8; 16];
        let mut c = 0;
        while c < 16 {
            t[c] = SPECIAL_ROW
                | if c >= 1 { LETTER_FROM_1 } else { 0 }
                | if c <= 10 { LETTER_TO_10 } else { 0 }
                | if c <= 9 { DIGITS } else { 0 }
                | if c == 0 { SPACE_BYTE } else { 0 }
                | if c == 2 { QUOTE } else { 0 }
                | if c == 12 { BACKSLASH } else { 0 }
                | if c == 15 { DEL } else { 0 };
            c += 1;
        }
        t
    };

    /// The classes of a plain run's bytes, by run class number.
    const RUN_CLASSES: [u8; 5] = [PUNCT, LOWER, UPPER, DIGIT, SPACE];

    /// The run class of a row's bytes whose row and column share a bit (the others are punctuation, 0); checked at
    /// compile time against `class_of` for every byte, with the special bytes.
    const ROW_CLASS: [u8; 16] = {
        let t = [0, 0, 4, 3, 2, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut b = 0usize;
        while b < 256 {
            let (row, col) = (b >> 4, b & 15);
            let m = ROWS[row] & COLUMNS[col];
            let special = b == b'"' as usize || b == b'\\' as usize || b < 0x20 || b >= 0x7f;
            assert!((m & SPECIAL != 0) == special, "the nibble tables miss a special byte");
            let k = if m != 0 { t[row] } else { 0 };
            assert!(
                special || k == if m < t[row] { m } else { t[row] },
                "a class bit below a run class"
            );
            assert!(
                special || RUN_CLASSES[k as usize] == super::class_of(b as u8),
                "the nibble tables disagree with class_of"
            );
            b += 1;
        }
        t
    };
    /// Run class × 5, by run class.
    const TIMES5: [u8; 16] = [0, 5, 10, 15, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    /// Byte `k` (0 = low, 1 = high, stored plus 128 so that sums of them are unsigned) of the weight of the run
    /// class pair at index `prev * 5 + class`, in two 16-entry tables (indices 0..25).
    const fn run_pair_table(k: u32) -> [[u8; 16]; 2] {
        let mut t = [[0u8; 16]; 2];
        let mut i = 0;
        while i < 32 {
            let w = if i < 25 {
                PAIR_WEIGHT[pair_index(RUN_CLASSES[i / 5] as usize, RUN_CLASSES[i % 5])]
            } else {
                0
            };
            assert!(
                w >= i16::MIN as i32 && w <= i16::MAX as i32,
                "a pair weight does not fit in i16"
            );
            let byte = ((w as i16 as u16) >> (8 * k)) as u8;
            t[i / 16][i % 16] = if k == 1 { byte ^ 0x80 } else { byte };
            i += 1;
        }
        t
    }
    const RUN_LOW: [[u8; 16]; 2] = run_pair_table(0);
    const RUN_HIGH: [[u8; 16]; 2] = run_pair_table(1);

    /// The tables of the plain-run path, loaded into vectors once per call.
    struct RunTables {
        nibble: __m256i,
        rows: __m256i,
        columns: __m256i,
        row_class: __m256i,
        times5: __m256i,
        low: [__m256i; 2],
        high: [__m256i; 2],
        special: __m256i,
        zero: __m256i,
    }

    impl RunTables {
        #[target_feature(enable = "avx2")]
        #[inline]
        fn load() -> Self {
            Self {
                nibble: _mm256_set1_epi8(0x0f),
                rows: table(&ROWS),
                columns: table(&COLUMNS),
                row_class: table(&ROW_CLASS),
                times5: table(&TIMES5),
                low: [table(&RUN_LOW[0]), table(&RUN_LOW[1])],
                high: [table(&RUN_HIGH[0]), table(&RUN_HIGH[1])],
                special: _mm256_set1_epi8(SPECIAL as i8),
                zero: _mm256_setzero_si256(),
            }
        }

        /// Each byte's row (high nibble), and the bits its row and column share.
        #[target_feature(enable = "avx2")]
        #[inline]
        fn bits(&self, v: __m256i) -> (__m256i, __m256i) {
            let row = _mm256_and_si256(_mm256_srli_epi16::<4>(v), self.nibble);
            let bits = _mm256_and_si256(
                _mm256_shuffle_epi8(self.rows, row),
                _mm256_shuffle_epi8(self.columns, _mm256_and_si256(v, self.nibble)),
            );
            (row, bits)
        }

        /// The weight of each lane's pair, low byte and high byte (biased by 128), and the run class × 5 of each
        /// lane; `before` is the run class × 5 of the previous block's bytes (its last lane is the one used).
        #[target_feature(enable = "avx2")]
        #[inline]
        fn weights(&self, (row, bits): (__m256i, __m256i), before: __m256i) -> (__m256i, __m256i, __m256i) {
            // Punctuation shares no bit: run class 0.
            let c = _mm256_min_epu8(_mm256_shuffle_epi8(self.row_class, row), bits);
            let c5 = _mm256_shuffle_epi8(self.times5, c);
            // The previous byte's class × 5 in each lane: the last byte of the block before, then this block's.
            let p5 = _mm256_alignr_epi8::<15>(c5, _mm256_permute2x128_si256::<0x21>(before, c5));
            // Indices 0..25: bit 4 picks the second table, the shuffles read the low four bits.
            let idx = _mm256_add_epi8(p5, c);
            let second = _mm256_slli_epi16::<3>(idx);
            let look = |t: &[__m256i; 2]| {
                _mm256_blendv_epi8(_mm256_shuffle_epi8(t[0], idx), _mm256_shuffle_epi8(t[1], idx), second)
            };
            (look(&self.low), look(&self.high), c5)
        }
    }

    /// `0xff` then `0x00`, 32 of each: the 32 bytes from offset `32 - k` keep the first `k` lanes.
    static KEEP_FIRST: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut i = 0;
        while i < 32 {
            t[i] = 0xff;
            i += 1;
        }
        t
    };

    /// With `PREFIX` false, [`run_weight`]: every block, those the vector path cannot take summed by the scalar
    /// loop. With `PREFIX` true, [`plain_prefix`]: up to the first block holding a quote, a backslash, a control or
    /// a non-ASCII byte (or the tail shorter than a block), where it stops and says how far it got; when that byte is
    /// a quote after plain bytes only, the string ends there, and the block's bytes before it are weighed too (the
    /// third value is then true).
    #[target_feature(enable = "avx2")]
    fn run_weight_avx2<const PREFIX: bool>(run: &[u8]) -> (usize, i64, bool) {
        let t = RunTables::load();
        let (mut sum_lo, mut sum_hi) = (t.zero, t.zero);
        let mut vector_blocks = 0i64;
        let mut acc = 0i64;
        // Run class × 5 of the previous block's bytes, when that block went through the vector path.
        let mut prev5: Option<__m256i> = None;
        // A lowercase letter (run class 1), the stand-in before a block that follows none weighed by the vector path.
        let stand_in = _mm256_set1_epi8(5);
        // Lane 0 paired with the stand-in: take it out, and put the real pair (if any) in.
        let first_pair = |o: usize| {
            let first = usize::from(run[o]);
            let real = o
                .checked_sub(1)
                .map_or(0, |p| BYTE_PAIR_WEIGHT[usize::from(run[p]) | first << 8]);
            i64::from(real) - i64::from(PAIR_WEIGHT[pair_index(usize::from(LOWER), CLASS[first])])
        };
        let blocks = run.chunks_exact(32);
        let mut end = run.len() - blocks.remainder().len();
        let mut whole = false;
        for (n, chunk) in blocks.enumerate() {
            let o = 32 * n;
            // SAFETY: `chunk` is 32 readable bytes; the load is unaligned.
            let v = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
            let rb = t.bits(v);
            if _mm256_testz_si256(rb.1, t.special) == 0 {
                if PREFIX {
                    end = o;
                    let special = _mm256_cmpeq_epi8(_mm256_and_si256(rb.1, t.special), t.zero);
                    let k = (!_mm256_movemask_epi8(special).cast_unsigned()).trailing_zeros() as usize;
                    if chunk.get(k) == Some(&b'"') {
                        // The string ends in this block, plain to its end: weigh the lanes before the quote.
                        whole = true;
                        if k > 0 {
                            end = o + k;
                            let (wl, wh, _) = t.weights(rb, prev5.unwrap_or(stand_in));
                            if prev5.is_none() {
                                acc += first_pair(o);
                            }
                            // SAFETY: `32 - k..64 - k` lies within the 64 bytes; the load is unaligned.
                            let keep = unsafe { _mm256_loadu_si256(KEEP_FIRST[32 - k..].as_ptr().cast()) };
                            sum_lo = _mm256_add_epi64(sum_lo, _mm256_sad_epu8(_mm256_and_si256(wl, keep), t.zero));
                            sum_hi = _mm256_add_epi64(sum_hi, _mm256_sad_epu8(_mm256_and_si256(wh, keep), t.zero));
                        }
                    }
                    break;
                }
                acc += run_weight_scalar(&run[o.saturating_sub(1)..o + 32]);
                prev5 = None;
                continue;
            }
            let (wl, wh, c5) = t.weights(rb, prev5.unwrap_or(stand_in));
            if prev5.is_none() {
                acc += first_pair(o);
            }
            sum_lo = _mm256_add_epi64(sum_lo, _mm256_sad_epu8(wl, t.zero));
            sum_hi = _mm256_add_epi64(sum_hi, _mm256_sad_epu8(wh, t.zero));
            if !PREFIX {
                vector_blocks += 1;
            }
            prev5 = Some(c5);
        }
        if !PREFIX && end < run.len() {
            acc += run_weight_scalar(&run[end.saturating_sub(1)..]);
        }
        // Every byte of a prefix went through the vector path; of a run, every byte of its vector blocks.
        let lanes_weighed = if PREFIX {
            i64::try_from(end).unwrap_or(i64::MAX)
        } else {
            32 * vector_blocks
        };
        let lanes = |v: __m256i| {
            _mm256_extract_epi64::<0>(v)
                + _mm256_extract_epi64::<1>(v)
                + _mm256_extract_epi64::<2>(v)
                + _mm256_extract_epi64::<3>(v)
        };
        // High bytes are stored biased by 128 to sum them unsigned (the lanes left out are 0, not 128).
        (
            end,
            acc + lanes(sum_lo) + 256 * (lanes(sum_hi) - 128 * lanes_weighed),
            whole,
        )
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        fn check(run: &[u8]) {
            if available() && run.len() >= 32 {
                assert_eq!(
                    run_weight(run),
                    run_weight_scalar(run),
                    "{:?}",
                    String::from_utf8_lossy(run)
                );
            }
        }

        /// Text of `len` bytes from `alphabet`, by a small LCG seeded with `seed`.
        fn text(seed: u64, len: usize, alphabet: &[&[u8]]) -> Vec<u8> {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut out = Vec::with_capacity(len + 4);
            while out.len() < len {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                out.extend_from_slice(alphabet[(x >> 33) as usize % alphabet.len()]);
            }
            out.truncate(len);
            out
        }

        #[test]
        fn every_ascii_byte_pair() {
            assert!(available() || !cfg!(target_feature = "avx2"));
            for a in 0u8..0x80 {
                let run: Vec<u8> = (0u8..0x80).flat_map(|b| [a, b]).collect();
                check(&run);
            }
        }

        #[test]
        fn all_lengths_and_chunk_edges() {
            let prose: &[&[u8]] = &[
                b"a", b"e", b"t", b" ", b"Q", b",", b".", b"7", b"\n", b"\t", b"\x7f", b"{",
            ];
            let mixed: &[&[u8]] = &[
                b"a",
                b"b",
                b" ",
                b"X",
                b"9",
                b"\\",
                b"\"",
                "é".as_bytes(),
                "中".as_bytes(),
                "😀".as_bytes(),
                b"\xff",
                b"\x80",
                b"\x01",
                b"~",
            ];
            for len in 0..200 {
                for seed in 0..8 {
                    check(&text(seed, len, prose));
                    check(&text(seed, len, mixed));
                    // Mostly ASCII with one odd byte somewhere: blocks switch between the two paths.
                    let mut t = text(seed, len, prose);
                    if len > 0 {
                        t[(seed as usize * 37) % len] = [0xe4, b'\\', 0xc3, 0x80][seed as usize % 4];
                    }
                    check(&t);
                }
            }
        }

        /// The vector path over escapes against the run-by-run scalar one, after characters of several classes.
        fn check_text(text: &[u8]) {
            if available() {
                for prev in [BREAK, LOWER, PUNCT, crate::tokens::LEAD4] {
                    assert_eq!(
                        text_weight(text, prev, 7),
                        crate::tokens::weight_scalar(text, true, prev, 7),
                        "{:?} after class {prev}",
                        String::from_utf8_lossy(text)
                    );
                }
            }
        }

        /// Pieces of escaped JSON text: two-byte escapes (the vector path's), `\u` escapes, surrogate pairs, bad and
        /// lone backslashes, non-ASCII.
        const ESCAPED: &[&[u8]] = &[
            b"a",
            b"b",
            b"e",
            b" ",
            b"Q",
            b"7",
            b",",
            b"\\n",
            b"\\\"",
            b"\\\\",
            b"\\t",
            b"\\/",
            b"\\r",
            b"\\b",
            b"\\f",
            b"\\u4e2d",
            b"\\u00e9",
            b"\\ud83d\\ude00",
            b"\\ud83d",
            b"\\x",
            b"\\",
            b"\\u12",
            "é".as_bytes(),
            b"\x01",
            b"\x7f",
        ];

        #[test]
        fn escaped_text_equals_the_scalar_sum() {
            let prose: &[&[u8]] = &[b"a", b"e", b"t", b" ", b"Q", b",", b".", b"7", b"\\n", b"\\\""];
            for len in 0..300 {
                for seed in 0..8 {
                    check_text(&text(seed, len, ESCAPED));
                    check_text(&text(seed, len, prose));
                    // An escape across each block edge: a backslash at every offset of a plain text.
                    let mut t = text(seed, len, &prose[..8]);
                    if len > 1 {
                        let at = (seed as usize * 29 + len) % (len - 1);
                        t[at] = b'\\';
                        t[at + 1] = [b'n', b'"', b'\\', b'u'][seed as usize % 4];
                    }
                    check_text(&t);
                }
            }
        }

        proptest! {
            #[test]
            fn escaped_text_equals_the_scalar_sum_on_random_text(
                pieces in proptest::collection::vec(proptest::sample::select(ESCAPED), 0..200),
            ) {
                check_text(&pieces.concat());
            }

            #[test]
            fn equals_the_scalar_sum(run in proptest::collection::vec(
                prop_oneof![8 => 0x20u8..0x7f, 1 => any::<u8>(), 1 => Just(b'\\')], 0..300)) {
                check(&run);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Classes and features.

const LOWER: u8 = 0;
const UPPER: u8 = 1;
const DIGIT: u8 = 2;
const SPACE: u8 = 3;
/// Line breaks, tabs and other control characters; also the class "before" the first byte.
const BREAK: u8 = 4;
const PUNCT: u8 = 5;
/// UTF-8 continuation bytes and bytes that are never valid in UTF-8. Classes from here up are non-ASCII.
const CONT: u8 = 6;
/// Lead bytes of 2-byte sequences: U+0080..U+037F (Latin-1, Latin extended, IPA).
const LEAD2_LATIN: u8 = 7;
/// Lead bytes of 2-byte sequences: U+0380..U+07FF (Greek, Cyrillic, Armenian, Hebrew, Arabic, ...).
const LEAD2_OTHER: u8 = 8;
/// Lead bytes E2 and EF: U+2000..U+2FFF and U+F000..U+FFFF (punctuation, symbols, fullwidth forms).
const LEAD3_SYMBOL: u8 = 9;
/// Lead byte E3: U+3000..U+3FFF (CJK punctuation, kana).
const LEAD3_KANA: u8 = 10;
/// Lead bytes E4..E9: U+4000..U+9FFF (CJK unified ideographs).
const LEAD3_HAN: u8 = 11;
/// Lead bytes EA..ED: U+A000..U+DFFF (mostly Hangul syllables).
const LEAD3_HANGUL: u8 = 12;
/// Lead bytes E0, E1, EE: U+0800..U+1FFF and U+E000..U+EFFF (Indic, Thai, Georgian, private use, ...).
const LEAD3_OTHER: u8 = 13;
/// Lead bytes F0..F4: U+10000 and up (emoji, rare CJK).
const LEAD4: u8 = 14;
/// The backslash that starts an escape, a flag bit outside the 16 pair classes: it is never part of a pair (an
/// escape is decoded to the class of the character it stands for).
const ESCAPE: u8 = 16;

const fn class_of(b: u8) -> u8 {
    match b {
        b'a'..=b'z' => LOWER,
        b'A'..=b'Z' => UPPER,
        b'0'..=b'9' => DIGIT,
        b' ' => SPACE,
        0..=0x1f | 0x7f => BREAK,
        b'\\' => ESCAPE,
        0x21..=0x7e => PUNCT,
        0xc2..=0xcd => LEAD2_LATIN,
        0xce..=0xdf => LEAD2_OTHER,
        0xe2 | 0xef => LEAD3_SYMBOL,
        0xe3 => LEAD3_KANA,
        0xe4..=0xe9 => LEAD3_HAN,
        0xea..=0xed => LEAD3_HANGUL,
        0xe0 | 0xe1 | 0xee => LEAD3_OTHER,
        0xf0..=0xf4 => LEAD4,
        _ => CONT,
    }
}

/// Class of the character `cp`: the class of its first UTF-8 byte (a backslash is punctuation).
fn class_of_char(cp: u32) -> u8 {
    let lead = match cp {
        0x5c => u32::from(b'/'),
        0..=0x7f => cp,
        0x80..=0x7ff => 0xc0 | cp >> 6,
        0x800..=0xffff => 0xe0 | cp >> 12,
        _ => 0xf0,
    };
    // NOTE: the table, not `class_of`'s match (a chain of compares: ~40 instructions more per `\u` escape).
    CLASS[usize::from(u8::try_from(lead).unwrap_or(0xf0))]
}

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = class_of(b as u8);
        b += 1;
    }
    t
};

/// Index of the pair (class `prev`, class `class`) in the 256-entry pair tables.
const fn pair_index(prev: usize, class: u8) -> usize {
    (prev << 4 | class as usize) & 0xff
}

/// Number of pair features; their names, in bit order, are [`FEATURE_NAMES`].
const FEATURES: usize = 26;

/// Names of the features, in bit order (the calibration script reads them from the test dump).
#[cfg(test)]
const FEATURE_NAMES: [&str; FEATURES] = [
    "lower",
    "upper",
    "word_after_space",
    "word_after_punct",
    "word_after_other",
    "camel_hump",
    "digit",
    "digit_run",
    "punct",
    "punct_run",
    "punct_after_space",
    "space",
    "space_after_space",
    "space_after_break",
    "break",
    "break_run",
    "break_after_punct",
    "lead2_latin",
    "lead2_other",
    "lead3_symbol",
    "lead3_kana",
    "lead3_han",
    "lead3_hangul",
    "lead3_other",
    "lead4",
    "nonascii_run",
];

/// The features that fire for a character of class `c` after one of class `pc`, as a bit set in
/// [`FEATURE_NAMES`] order. All non-ASCII previous classes behave alike, so a decoded escape (whose continuation
/// bytes are never visited) and its literal UTF-8 bytes give the same features.
const fn pair_features(pc: u8, c: u8) -> u32 {
    let letter = c == LOWER || c == UPPER;
    let pc_ascii = pc < CONT;
    let on = [
        c == LOWER,
        c == UPPER,
        letter && pc == SPACE,
        letter && pc == PUNCT,
        letter && (pc == DIGIT || pc == BREAK),
        c == UPPER && pc == LOWER,
        c == DIGIT,
        c == DIGIT && pc != DIGIT,
        c == PUNCT,
        c == PUNCT && pc != PUNCT,
        c == PUNCT && pc == SPACE,
        c == SPACE,
        c == SPACE && pc == SPACE,
        c == SPACE && pc == BREAK,
        c == BREAK,
        c == BREAK && pc != BREAK,
        c == BREAK && pc == PUNCT,
        c == LEAD2_LATIN,
        c == LEAD2_OTHER,
        c == LEAD3_SYMBOL,
        c == LEAD3_KANA,
        c == LEAD3_HAN,
        c == LEAD3_HANGUL,
        c == LEAD3_OTHER,
        c == LEAD4,
        c > CONT && pc_ascii,
    ];
    let mut f = 0u32;
    let mut bit = 0;
    while bit < FEATURES {
        f |= (on[bit] as u32) << bit;
        bit += 1;
    }
    f
}

/// Feature bits of every (previous class, class) pair, indexed by [`pair_index`].
const FEATURE_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = pair_features((i >> 4) as u8, (i & 0xf) as u8);
        i += 1;
    }
    t
};

/// Fixed-point token weight of every (previous class, class) pair: its features dotted with [`WEIGHTS`].
static PAIR_WEIGHT: [i32; 256] = {
    let mut t = [0i32; 256];
    let mut i = 0;
    while i < 256 {
        let mut bit = 0;
        while bit < FEATURES {
            if FEATURE_TABLE[i] & (1 << bit) != 0 {
                t[i] += WEIGHTS[bit];
            }
            bit += 1;
        }
        i += 1;
    }
    t
};

/// `PAIR_WEIGHT` of two adjacent bytes' classes, at index `first | second << 8` (128 KiB). Pairs with a backslash
/// are never looked up (escapes end a run).
static BYTE_PAIR_WEIGHT: [i16; 1 << 16] = {
    let mut t = [0i16; 1 << 16];
    let mut i = 0;
    while i < 1 << 16 {
        let w = PAIR_WEIGHT[pair_index(CLASS[i & 0xff] as usize, CLASS[i >> 8])];
        assert!(
            w >= i16::MIN as i32 && w <= i16::MAX as i32,
            "a pair weight does not fit in i16"
        );
        t[i] = w as i16;
        i += 1;
    }
    t
};

/// Weights are in units of 2^-SCALE_BITS tokens.
const SCALE_BITS: u32 = 12;

// BEGIN CALIBRATED WEIGHTS (generated by tests/fixtures/tokens/calibrate.py; do not edit by hand)
const WEIGHTS: [i32; FEATURES] = [
    214, 1146, 1595, -1098, 4129, -2568, 1104, 3081, 1247, 2650, 990, 1639, -1491, 4289, 2893, -165, -3611, 630, 559,
    6194, 2999, 2998, 1460, 366, 3316, 2942,
];
// END CALIBRATED WEIGHTS

// ---------------------------------------------------------------------------------------------------------------
// Escapes.

/// Decode the escape at the start of `tail` (which starts with a backslash): the character it stands for and the
/// number of raw bytes it spans. A malformed escape stands for a literal backslash; a lone surrogate for U+FFFD.
fn decode_escape(tail: &[u8]) -> (char, usize) {
    let Some(&kind) = tail.get(1) else {
        return ('\\', 1);
    };
    let simple = match kind {
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'"' | b'\\' | b'/' => char::from(kind),
        b'u' => {
            let Some(hi) = hex4(tail.get(2..6)) else {
                return ('\\', 1);
            };
            let (cp, len) = match hi {
                0xd800..=0xdbff => match (tail.get(6..8), hex4(tail.get(8..12))) {
                    (Some(b"\\u"), Some(lo @ 0xdc00..=0xdfff)) => (0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00), 12),
                    _ => (0xfffd, 6),
                },
                _ => (hi, 6),
            };
            return (char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER), len);
        }
        _ => return ('\\', 1),
    };
    (simple, 2)
}

/// The class of the character the escape at the start of `tail` stands for, and its length in raw bytes. The same
/// answer as decoding with [`decode_escape`], without building the character: only the leading hex digits decide
/// the UTF-8 lead byte.
#[inline]
fn escape_class(tail: &[u8]) -> (u8, usize) {
    match tail.get(1) {
        Some(b'n' | b'r' | b't' | b'b' | b'f') => (BREAK, 2),
        Some(b'"' | b'\\' | b'/') => (PUNCT, 2),
        Some(b'u') => match hex4(tail.get(2..6)) {
            Some(0xd800..=0xdbff) => match (tail.get(6..8), hex4(tail.get(8..12))) {
                (Some(b"\\u"), Some(0xdc00..=0xdfff)) => (LEAD4, 12),
                _ => (LEAD3_SYMBOL, 6), // U+FFFD
            },
            Some(0xdc00..=0xdfff) => (LEAD3_SYMBOL, 6),
            Some(cp) => (class_of_char(cp), 6),
            None => (PUNCT, 1),
        },
        _ => (PUNCT, 1),
    }
}

/// Value of an ASCII hex digit, or 0xff.
static HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = match b as u8 {
            d @ b'0'..=b'9' => d - b'0',
            d @ b'a'..=b'f' => d - b'a' + 10,
            d @ b'A'..=b'F' => d - b'A' + 10,
            _ => 0xff,
        };
        b += 1;
    }
    t
};

fn hex4(digits: Option<&[u8]>) -> Option<u32> {
    let &[a, b, c, d] = digits? else { return None };
    let [a, b, c, d] = [a, b, c, d].map(|x| HEX[usize::from(x)]);
    ((a | b | c | d) < 16).then(|| u32::from(a) << 12 | u32::from(b) << 8 | u32::from(c) << 4 | u32::from(d))
}

// ---------------------------------------------------------------------------------------------------------------
// The exact path.

fn o200k() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref()
}

fn cl100k() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::cl100k_base().ok()).as_ref()
}

/// Exact count with `bpe`, special-token text counted as ordinary text; the fast estimate if the BPE failed to load.
fn count_exact(bpe: Option<&CoreBPE>, text: &[u8]) -> u32 {
    let Some(bpe) = bpe else {
        return estimate_fast(text);
    };
    let decoded = unescape(text);
    u32::try_from(bpe.encode_ordinary(&decoded).len()).unwrap_or(u32::MAX)
}

/// The string a JSON string's raw content stands for; malformed escapes and invalid UTF-8 decode leniently.
fn unescape(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = memchr::memchr(b'\\', rest) {
        out.extend_from_slice(&rest[..i]);
        let (ch, len) = decode_escape(&rest[i..]);
        out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
        rest = rest.get(i + len..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Feature counts of `text` in [`FEATURE_NAMES`] order, by a plain byte-at-a-time walk (escapes decoded, their
/// continuation bytes skipped). The fast estimate must equal these dotted with [`WEIGHTS`]; calibration fits on them.
#[cfg(test)]
fn features(text: &[u8]) -> [u32; FEATURES] {
    let mut counts = [0u32; FEATURES];
    let mut prev = BREAK;
    let mut i = 0;
    while i < text.len() {
        let (class, len) = if text[i] == b'\\' {
            let (ch, len) = decode_escape(&text[i..]);
            assert_eq!(escape_class(&text[i..]), (class_of_char(u32::from(ch)), len));
            (class_of_char(u32::from(ch)), len)
        } else {
            (CLASS[usize::from(text[i])], 1)
        };
        let mask = FEATURE_TABLE[pair_index(usize::from(prev), class)];
        for (bit, count) in counts.iter_mut().enumerate() {
            *count += (mask >> bit) & 1;
        }
        prev = class;
        i += len;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// A JSON string's content `s`, its closing quote and what follows it in a body: the prefix weighed while the
    /// end is unknown stays inside the string, and the estimate finished from it is the estimate of the whole.
    fn check_prefix(s: &[u8], after: &[u8]) {
        let mut buf = s.to_vec();
        buf.push(b'"');
        buf.extend_from_slice(after);
        let prefix = plain_prefix(&buf);
        assert!(
            prefix.len <= s.len() && (prefix.len.is_multiple_of(32) || prefix.whole),
            "{prefix:?}"
        );
        // A whole prefix is the whole string, plain (the quote after it is its closing quote).
        assert!(
            !prefix.whole || (prefix.len == s.len() && buf[s.len()] == b'"'),
            "{prefix:?}"
        );
        assert!(s[..prefix.len]
            .iter()
            .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\'));
        assert_eq!(
            estimate_after(s, true, prefix),
            estimate_raw(s, true),
            "{:?}",
            String::from_utf8_lossy(s)
        );
        if !s.contains(&b'\\') {
            assert_eq!(estimate_after(s, false, prefix), estimate_raw(s, false));
        }
    }

    #[test]
    fn a_plain_prefix_finishes_to_the_same_estimate() {
        let sentence = b"The quick brown fox jumps over the lazy dog, and then explains why it did so. ";
        let long: Vec<u8> = sentence.iter().copied().cycle().take(2000).collect();
        for len in [0, 1, 31, 32, 63, 64, 65, 95, 96, 97, 200, 1999, 2000] {
            check_prefix(&long[..len], b"}, {\"role\": \"user\"}]}");
            for at in [0, 1, 31, 32, 33, 63, 64, 100, 150] {
                for odd in [&b"\\n"[..], b"\\\"", "é".as_bytes(), b"\x01", b"\t", b"\x7f"] {
                    if at <= len {
                        let mut t = long[..len].to_vec();
                        t.splice(at..at, odd.iter().copied());
                        check_prefix(&t, b"\"");
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            assert_eq!(
                plain_prefix(&long).len,
                1984,
                "every whole block of plain text is weighed in one pass"
            );
            // A string that ends in a block the prefix reads is weighed to its end, short or long.
            for len in [0, 1, 28, 31, 32, 33, 1999, 2000] {
                let mut buf = long[..len].to_vec();
                buf.extend_from_slice(
                    b"\"}, {\"role\": \"assistant\", \"content\": \"\"}], \"max_tokens\": 256, \"stream\": true}",
                );
                let p = plain_prefix(&buf);
                assert!(p.whole && p.len == len, "{len}: {p:?}");
                assert_eq!(
                    estimate_after(&long[..len], false, p),
                    estimate_raw(&long[..len], false)
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn a_plain_prefix_finishes_to_the_same_estimate_on_random_strings(
            s in proptest::collection::vec(proptest::prop_oneof![
                12 => 0x20u8..0x7f,
                1 => proptest::prelude::Just(b'\\'),
                1 => proptest::prelude::any::<u8>(),
            ], 0..400),
            after in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            // The content of a string holds no bare quote: cut it at the first one.
            let end = s.iter().position(|&b| b == b'"').unwrap_or(s.len());
            check_prefix(&s[..end], &after);
        }
    }

    struct Sample {
        category: String,
        raw: String,
        o200k: u32,
        cl100k: u32,
    }

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokens")
    }

    /// Every corpus sample with its reference counts (see tests/fixtures/tokens/README.md).
    fn corpus() -> Vec<Sample> {
        let dir = fixtures();
        let expected = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
        let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut out = Vec::new();
        for row in expected.lines().skip(1) {
            let cols: Vec<&str> = row.split('\t').collect();
            let category = cols[0].to_owned();
            let lines = files.entry(category.clone()).or_insert_with(|| {
                let text = std::fs::read_to_string(dir.join(format!("{category}.txt"))).unwrap();
                text.lines().map(str::to_owned).collect()
            });
            let raw = lines[cols[1].parse::<usize>().unwrap()].clone();
            assert_eq!(raw.len(), cols[4].parse::<usize>().unwrap(), "{row}");
            out.push(Sample {
                category,
                raw,
                o200k: cols[2].parse().unwrap(),
                cl100k: cols[3].parse().unwrap(),
            });
        }
        assert!(out.len() > 100);
        out
    }

    fn quantile(v: &mut [f64], q: f64) -> f64 {
        v.sort_by(f64::total_cmp);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v[i]
    }

    fn rel_err(est: u32, exact: u32) -> f64 {
        (f64::from(est) - f64::from(exact)).abs() / f64::from(exact.max(1))
    }

    #[test]
    fn empty_is_zero_and_nonempty_is_at_least_one() {
        assert_eq!(estimate_fast(b""), 0);
        assert_eq!(Estimator::Fast.count(b""), 0);
        assert_eq!(Estimator::ExactO200k.count(b""), 0);
        for t in [&b"a"[..], b" ", b"\\n", b"!", "é".as_bytes(), b"\\u4e2d"] {
            assert!(estimate_fast(t) >= 1, "{t:?}");
        }
    }

    #[test]
    fn ascii_sentence_is_about_one_token_per_word() {
        let t = b"The quick brown fox jumps over the lazy dog near the river bank.";
        let n = estimate_fast(t);
        assert!((12..=16).contains(&n), "{n}");
    }

    #[test]
    fn cjk_costs_about_one_token_per_character() {
        let t = "模型路由器的作用是根据请求的内容把每一个请求发送到最合适的模型";
        let chars = u32::try_from(t.chars().count()).unwrap();
        let n = estimate_fast(t.as_bytes());
        assert!(n * 2 >= chars && n <= chars * 3 / 2, "{n} for {chars} chars");
    }

    #[test]
    fn escaped_and_literal_text_estimate_the_same() {
        let literal = "Line one.\nSay \"hi\" — 中文 and 😀 with a \\ backslash\ttab";
        let escaped_utf8 = r#"Line one.\nSay \"hi\" — 中文 and 😀 with a \\ backslash\ttab"#;
        let escaped_ascii = r#"Line one.\nSay \"hi\" \u2014 \u4e2d\u6587 and \ud83d\ude00 with a \\ backslash\ttab"#;
        assert_eq!(features(literal.as_bytes()), features(escaped_utf8.as_bytes()));
        assert_eq!(features(literal.as_bytes()), features(escaped_ascii.as_bytes()));
        assert_eq!(unescape(escaped_ascii.as_bytes()), literal);
        assert_eq!(unescape(escaped_utf8.as_bytes()), literal);
    }

    #[test]
    fn malformed_escapes_do_not_panic() {
        for t in [
            &b"\\"[..],
            b"abc\\",
            b"\\u12",
            b"\\uzzzz",
            b"\\ud800",
            b"\\ud800\\u0041",
            b"\\udc00x",
            b"\\q",
        ] {
            let _ = estimate_fast(t);
            let _ = Estimator::ExactO200k.count(t);
        }
        assert_eq!(unescape(b"\\ud800\\u0041"), "\u{fffd}A");
    }

    #[test]
    fn estimate_is_the_dot_product_of_features_and_weights() {
        for s in corpus() {
            assert_eq!(i64::from(estimate_fast(s.raw.as_bytes())), dot(s.raw.as_bytes()));
        }
    }

    fn dot(text: &[u8]) -> i64 {
        let acc: i64 = WEIGHTS
            .iter()
            .zip(&features(text))
            .map(|(&w, &c)| i64::from(w) * i64::from(c))
            .sum();
        if text.is_empty() {
            0
        } else {
            ((acc + (1 << (SCALE_BITS - 1))) >> SCALE_BITS).max(1)
        }
    }

    proptest::proptest! {
        #[test]
        fn estimate_is_the_dot_product_on_any_bytes(text in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            proptest::prop_assert_eq!(i64::from(estimate_fast(&text)), dot(&text));
        }

        #[test]
        fn estimate_is_the_dot_product_on_escape_heavy_text(text in r#"([a-zA-Z0-9 .,\n"]|\\u[0-9a-fA-F]{0,4}|\\[nt"/\\q]|[中é😀]){0,60}"#) {
            proptest::prop_assert_eq!(i64::from(estimate_fast(text.as_bytes())), dot(text.as_bytes()));
            if !text.contains('\\') {
                proptest::prop_assert_eq!(estimate_raw(text.as_bytes(), false), estimate_fast(text.as_bytes()));
            }
        }
    }

    #[test]
    fn estimate_grows_with_text() {
        let unit = "Routing decisions should be cheap; 42 of them per millisecond is fine. ";
        let mut prev = 0;
        for n in 1..50 {
            let est = estimate_fast(unit.repeat(n).as_bytes());
            assert!(est > prev, "{n}: {est} <= {prev}");
            prev = est;
        }
    }

    /// Per-category bound on p90 relative error (overall p90 must be ≤ 10 %); the same table as
    /// tests/test_tokens.py, which explains the numbers. In-sample regression guards: calibrate.py prints the
    /// cross-validated errors.
    fn category_p90_bound(category: &str) -> f64 {
        match category.trim_end_matches("_ascii") {
            "multilingual" => 0.20,
            "mmlu" | "numbers" | "json" | "mixed" | "cjk" => 0.15,
            _ => 0.12,
        }
    }

    #[test]
    fn fast_estimate_is_within_bounds_on_the_corpus() {
        let mut by_cat: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut all = Vec::new();
        for s in corpus() {
            let e = rel_err(estimate_fast(s.raw.as_bytes()), s.o200k);
            by_cat.entry(s.category).or_default().push(e);
            all.push(e);
        }
        let mut failures = Vec::new();
        for (cat, errs) in &mut by_cat {
            let (med, p90) = (quantile(errs, 0.5), quantile(errs, 0.9));
            eprintln!(
                "{cat:20} n={:3} median={:5.1}% p90={:5.1}%",
                errs.len(),
                med * 100.0,
                p90 * 100.0
            );
            if p90 > category_p90_bound(cat) {
                failures.push(format!("{cat}: p90 {:.1}%", p90 * 100.0));
            }
        }
        let (med, p90) = (quantile(&mut all, 0.5), quantile(&mut all, 0.9));
        eprintln!(
            "{:20} n={:3} median={:5.1}% p90={:5.1}%",
            "overall",
            all.len(),
            med * 100.0,
            p90 * 100.0
        );
        assert!(p90 <= 0.10, "overall p90 {:.1}%", p90 * 100.0);
        assert!(failures.is_empty(), "{failures:?}");
    }

    #[test]
    fn exact_counts_match_the_reference() {
        for s in corpus() {
            assert_eq!(
                Estimator::ExactO200k.count(s.raw.as_bytes()),
                s.o200k,
                "o200k {}: {}",
                s.category,
                s.raw
            );
            assert_eq!(
                Estimator::ExactCl100k.count(s.raw.as_bytes()),
                s.cl100k,
                "cl100k {}: {}",
                s.category,
                s.raw
            );
        }
    }

    /// Writes the feature counts of every corpus sample for `calibrate.py` (which runs this test).
    #[test]
    #[ignore = "run by tests/fixtures/tokens/calibrate.py"]
    fn dump_features() {
        let path = std::env::var("FASTROUTE_TOKENS_FEATURES").unwrap();
        let mut out = format!("category\to200k\t{}\n", FEATURE_NAMES.join("\t"));
        for s in corpus() {
            let f: Vec<String> = features(s.raw.as_bytes()).iter().map(u32::to_string).collect();
            out += &format!("{}\t{}\t{}\n", s.category, s.o200k, f.join("\t"));
        }
        std::fs::write(path, out).unwrap();
    }

    /// Throughput probe: `cargo test --release --lib tokens::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing probe; run in release"]
    fn throughput() {
        let mut text = String::new();
        let samples = corpus();
        while text.len() < 1 << 20 {
            for s in &samples {
                text += &s.raw;
                text.push(' ');
            }
        }
        let mixed = &text.as_bytes()[..1 << 20];
        let prose = corpus()
            .iter()
            .filter(|s| s.category == "prose")
            .map(|s| s.raw.clone())
            .collect::<String>();
        let prose = prose.repeat((1 << 20) / prose.len() + 1);
        // Median over 15 batches of 20 runs, by wall clock and by this thread's on-CPU time (Linux schedstat,
        // updated at scheduler ticks, hence batches): on an oversubscribed machine the second excludes the time the
        // thread sat descheduled.
        let on_cpu_ns = || -> Option<f64> {
            std::fs::read_to_string("/proc/thread-self/schedstat")
                .ok()?
                .split(' ')
                .next()?
                .parse()
                .ok()
        };
        let rate = |text: &[u8]| {
            let (mut wall, mut cpu) = (Vec::new(), Vec::new());
            for _ in 0..15 {
                let c = on_cpu_ns();
                let t = std::time::Instant::now();
                for _ in 0..20 {
                    std::hint::black_box(Estimator::Fast.count(std::hint::black_box(text)));
                }
                let bytes = 20.0 * text.len() as f64;
                wall.push(bytes / t.elapsed().as_secs_f64() / 1e9);
                if let (Some(c0), Some(c1)) = (c, on_cpu_ns()) {
                    cpu.push(bytes / (c1 - c0));
                }
            }
            let cpu = if cpu.is_empty() {
                f64::NAN
            } else {
                quantile(&mut cpu, 0.5)
            };
            format!("median {:.2} GB/s wall, {cpu:.2} GB/s on-CPU", quantile(&mut wall, 0.5))
        };
        let _ = Estimator::ExactO200k.count(b"warm up");
        let exact = |text: &[u8]| {
            let t = std::time::Instant::now();
            std::hint::black_box(Estimator::ExactO200k.count(text));
            text.len() as f64 / t.elapsed().as_secs_f64() / 1e6
        };
        eprintln!(
            "fast over 1 MiB: mixed corpus {}, prose {}; exact o200k: {:.1} MB/s",
            rate(mixed),
            rate(&prose.as_bytes()[..1 << 20]),
            exact(&mixed[..1 << 18]),
        );
    }
}
