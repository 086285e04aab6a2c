//! The complexity classifier behind `classify: complexity` routes: features counted over the prompt
//! text during the body scan (`Features::observe`), and a logistic scorer that maps them to [0, 1].
//! The scorer is either a trained model (`Scorer`, weights from a model file that Python reads and
//! this module validates) or the fixed hand-set weights of `score_builtin`. This module must never
//! look at anything but prompt text and the token estimate, and never allocate while scoring.
//!
//! Features: dense counts (`DENSE_FEATURES`, transformed by `Features::dense`) plus hashed word
//! unigrams and bigrams. Each n-gram hashes to a bucket of a fixed-size weight table; the scorer sums
//! the weights of the buckets hit while scanning and divides by √hits, so there is no per-request
//! vector. Training (`fastroute train`) reads the same features through `Grams::Collect`.

use std::cell::RefCell;

use serde::Deserialize;

/// Counts gathered over every text string of one request. Cheap, additive, `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Features {
    /// `?` characters.
    pub questions: u32,
    /// Code fences (three backticks).
    pub code_fences: u32,
    /// Math symbols: `=`, `^`, `+`, `<`, `>`, `*`, `/`, `\`, and the Unicode math operator blocks.
    pub math: u32,
    /// Words asking for reasoning (explain, analyze, compare, prove, design, why, "step by step", …).
    pub reasoning: u32,
    /// Words stating constraints (must, should, ensure, without, exactly, …).
    pub constraints: u32,
    /// Lines that start a list item (`- `, `* `, `1.`, `2)`).
    pub list_items: u32,
    /// Raw text bytes (escapes counted as written).
    pub bytes: u32,
    /// Words: runs of letters, digits and non-ASCII characters.
    pub words: u32,
    /// Words that start with a digit.
    pub numbers: u32,
    /// Line breaks.
    pub lines: u32,
    /// Non-ASCII characters (raw UTF-8 or `\u` escapes).
    pub non_ascii: u32,
    /// Messages in `messages`.
    pub turns: u32,
    /// Text bytes inside `system` / `developer` messages.
    pub system_bytes: u32,
    /// N-gram bucket hits (unigrams and bigrams).
    pub gram_hits: u32,
    /// Sum of the n-gram weights hit (with `Grams::Weights`).
    pub gram_sum: f32,
}

/// What `observe` does with each hashed n-gram.
#[derive(Debug, Clone, Copy, Default)]
pub enum Grams<'m> {
    /// Count hits only.
    #[default]
    Off,
    /// Sum the weight of each bucket hit (the table length is a power of two).
    Weights(&'m [f32]),
    /// Record each bucket hit, masked to `mask` (training; allocates).
    Collect(&'m RefCell<Vec<u32>>, u32),
}

// Word hashing. A word's lowercased bytes are packed little-endian into 8-byte chunks; each full chunk is mixed
// into the running hash (`mix`) and the last, partial one (zero-padded: no word byte is zero) finishes it. Raw
// ASCII words are hashed a chunk at a time straight from the text (`alnum_bytes` finds where a word ends within
// 8 bytes, without a branch per byte); bytes decoded from escapes and non-ASCII bytes are pushed one at a time
// into the same chunks (`Observer::push`), so a word hashes alike however it is written. A word of at most 7
// bytes is one multiply of its bytes (a bijection), so two such words never share a hash.
const WORD_SEED: u64 = 0x243f_6a88_85a3_08d3;
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
const UNI: u64 = 0xff51_afd7_ed55_8ccd;
const BI: u64 = 0xc4ce_b9fe_1a85_ec53;

/// Mix one 8-byte chunk into a word hash (the rotation brings the well-mixed high half down).
#[inline(always)]
const fn mix(h: u64, chunk: u64) -> u64 {
    (h ^ chunk).wrapping_mul(MIX).rotate_left(32)
}

/// The bucket hash of a unigram, from its word hash: the high half of a multiply.
#[inline(always)]
const fn unigram(w: u64) -> u32 {
    (w.wrapping_mul(UNI) >> 32) as u32
}

/// The bucket hash of a bigram, from the two word hashes (ordered: the previous one is rotated).
#[inline(always)]
const fn bigram(prev: u64, w: u64) -> u32 {
    ((prev.rotate_left(17) ^ w).wrapping_mul(BI) >> 32) as u32
}

/// The hash of a whole word (ASCII letters lowercased): what `observe` computes for it, however written.
#[must_use]
pub const fn word_hash(w: &[u8]) -> u64 {
    let (mut h, mut pend, mut k, mut i) = (WORD_SEED, 0u64, 0, 0);
    while i < w.len() {
        pend |= (w[i].to_ascii_lowercase() as u64) << (8 * k);
        k += 1;
        i += 1;
        if k == 8 {
            h = mix(h, pend);
            (pend, k) = (0, 0);
        }
    }
    mix(h, pend)
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = ONES * 0x80;
const LOW7: u64 = ONES * 0x7f;
const CASE: u64 = ONES * 0x20;

/// 0x80 in each byte of `x` that is an ASCII letter or digit, 0 in the others (SWAR range tests: with the top
/// bit of each byte cleared, adding `0x80 - lo` sets it exactly when the byte is `>= lo`, and no carry crosses
/// into the next byte).
#[inline(always)]
const fn alnum_bytes(x: u64) -> u64 {
    let low = x & LOW7;
    let lower = low | CASE;
    let letter = lower.wrapping_add(ONES * (0x80 - 0x61)) & !lower.wrapping_add(ONES * (0x7f - 0x7a));
    let digit = low.wrapping_add(ONES * (0x80 - 0x30)) & !low.wrapping_add(ONES * (0x7f - 0x39));
    (letter | digit) & !x & HIGH
}

/// The 8 bytes at `i` (little-endian), zero-padded past the end of `text`.
#[inline(always)]
fn load8(text: &[u8], i: usize) -> u64 {
    if i + 8 <= text.len() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&text[i..i + 8]);
        u64::from_le_bytes(b)
    } else {
        let mut b = [0u8; 8];
        let rest = text.get(i..).unwrap_or_default();
        b[..rest.len()].copy_from_slice(rest);
        u64::from_le_bytes(b)
    }
}

const REASONING: &[&[u8]] = &[
    b"explain",
    b"analyze",
    b"analyse",
    b"compare",
    b"prove",
    b"proof",
    b"design",
    b"why",
    b"derive",
    b"implement",
    b"optimize",
    b"evaluate",
    b"justify",
    b"architecture",
    b"tradeoffs",
    b"algorithm",
    b"debug",
    b"refactor",
];

const CONSTRAINTS: &[&[u8]] = &[
    b"must",
    b"should",
    b"ensure",
    b"without",
    b"exactly",
    b"least",
    b"most",
    b"only",
    b"never",
    b"always",
    b"require",
    b"requires",
];

const fn hashes<const N: usize>(words: &[&[u8]]) -> [u64; N] {
    let mut out = [0u64; N];
    let mut i = 0;
    while i < N {
        out[i] = word_hash(words[i]);
        i += 1;
    }
    out
}

// NOTE: cue words are found by their 64-bit word hash (no byte comparison): a bloom filter rules out almost every
// other word with one lookup; the few that pass compare hashes.
const REASONING_HASHES: [u64; REASONING.len()] = hashes(REASONING);
const CONSTRAINT_HASHES: [u64; CONSTRAINTS.len()] = hashes(CONSTRAINTS);
const STEP: u64 = word_hash(b"step");
const BY: u64 = word_hash(b"by");

/// The bloom filter's bit of a word hash, from its unigram hash `u` (which the word's weight lookup has already
/// computed): (word, bit) from bits 26..32 and 0..6 of `u` (a shift by `u` takes its low 6 bits: one `bt`).
#[inline(always)]
const fn bloom_slot(w: u64) -> (usize, u64) {
    bloom_bit(unigram(w))
}

/// `bloom_slot`, from the unigram hash `u`.
#[inline(always)]
const fn bloom_bit(u: u32) -> (usize, u64) {
    ((u >> 26) as usize, 1 << (u & 63))
}

/// A bit per cue word hash (and "step", "by").
const CUE_BLOOM: [u64; 64] = {
    let mut out = [0u64; 64];
    let mut i = 0;
    while i < REASONING.len() + CONSTRAINTS.len() + 2 {
        let h = if i < REASONING.len() {
            REASONING_HASHES[i]
        } else if i < REASONING.len() + CONSTRAINTS.len() {
            CONSTRAINT_HASHES[i - REASONING.len()]
        } else if i == REASONING.len() + CONSTRAINTS.len() {
            STEP
        } else {
            BY
        };
        let (w, bit) = bloom_slot(h);
        out[w] |= bit;
        i += 1;
    }
    out
};

/// ASCII letters and digits.
const ALNUM: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    t
};

/// ASCII punctuation that only ends a word: no feature counts it and no list item starts with it. Not the quote:
/// an unescaped one ends the text (`Features::observe`).
const PLAIN_SEP: [bool; 256] = {
    let mut t = [false; 256];
    let seps = b" ,.;:!()[]{}<>'%&@#|~_";
    let mut i = 0;
    while i < seps.len() {
        t[seps[i] as usize] = true;
        i += 1;
    }
    t
};

/// The n-gram table of `Grams::Off`: every hit adds 0.
static NO_WEIGHTS: [f32; 1] = [0.0];

/// The state of one `observe` call: the word being read and what came before it. `COLLECT`: record each bucket
/// hit (training) instead of summing weights.
struct Observer<'f, 'm, const COLLECT: bool> {
    f: &'f mut Features,
    /// The weight table (`NO_WEIGHTS` without one); `mask` = its length - 1 when a power of two.
    table: &'m [f32],
    mask: usize,
    /// `Grams::Collect`'s buffer and mask.
    collect: Option<(&'m RefCell<Vec<u32>>, u32)>,
    /// The sum of the n-gram weights hit, written to `f` at the end.
    sum: f32,
    /// Words seen by this call: n-gram hits are `2 * words - 1` (a unigram each, a bigram each but the first).
    words: u32,
    /// The word being read: the running hash of its full chunks, the partial chunk, its length in that chunk and
    /// in all.
    hash: u64,
    pend: u64,
    npend: u32,
    wlen: u32,
    /// The previous word's hash (when `words > 0`), for the bigram.
    prev: u64,
    /// "step by step" so far, by word index.
    steps: Steps,
    ticks: u32,
    line_start: bool,
    last: u8,
    /// Walk raw ASCII text with the AVX2 block masks (`walk`); false: the portable byte loop alone.
    simd: bool,
    /// No walk before this offset (after a walk that stopped at once).
    rest_until: usize,
}

impl<'f, 'm, const COLLECT: bool> Observer<'f, 'm, COLLECT> {
    fn new(f: &'f mut Features, table: &'m [f32], collect: Option<(&'m RefCell<Vec<u32>>, u32)>, simd: bool) -> Self {
        Self {
            f,
            table,
            mask: table.len().wrapping_sub(1),
            collect,
            sum: 0.0,
            words: 0,
            hash: WORD_SEED,
            pend: 0,
            npend: 0,
            wlen: 0,
            prev: 0,
            steps: Steps::NONE,
            ticks: 0,
            line_start: true,
            last: 0,
            simd,
            rest_until: 0,
        }
    }

    /// Add one (lowercased) byte to the current word.
    #[inline(always)]
    fn push(&mut self, c: u8) {
        self.pend |= u64::from(c) << (8 * self.npend);
        self.npend += 1;
        self.wlen += 1;
        if self.npend == 8 {
            self.hash = mix(self.hash, self.pend);
            (self.pend, self.npend) = (0, 0);
        }
    }

    /// One unescaped byte that is not the start of a raw ASCII word (those take the fast path in `observe`), or
    /// any byte decoded from an escape. `rest` is the raw text from this byte on (for list markers), empty when
    /// the byte came from an escape.
    #[inline(always)]
    fn unit(&mut self, c: u8, rest: &[u8]) {
        if c.is_ascii_alphanumeric() || c >= 0x80 {
            if self.line_start {
                self.line_start = false;
                if is_list_marker(rest) {
                    self.f.list_items += 1;
                }
            }
            if c >= 0xC0 {
                self.f.non_ascii += 1;
            } else if self.last == 0xE2 && (0x88..=0x8B).contains(&c) {
                self.f.math += 1; // U+2200..U+22FF, mathematical operators
            }
            if self.wlen == 0 && c.is_ascii_digit() {
                self.f.numbers += 1;
            }
            self.push(c.to_ascii_lowercase());
            self.ticks = 0;
            self.last = c;
            return;
        }
        self.end_word();
        if c == b'`' {
            self.ticks += 1;
            if self.ticks == 3 {
                self.f.code_fences += 1;
                self.ticks = 0;
            }
        } else {
            self.ticks = 0;
        }
        match c {
            b'?' => self.f.questions += 1,
            b'=' | b'^' | b'+' | b'$' => self.f.math += 1,
            b'\n' => {
                self.f.lines += 1;
                self.line_start = true;
            }
            _ => {}
        }
        if self.line_start && !matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
            self.line_start = false;
            if is_list_marker(rest) {
                self.f.list_items += 1;
            }
        }
        self.last = c;
    }

    #[inline(always)]
    fn hit(&mut self, h: u32) {
        if COLLECT {
            if let Some((out, mask)) = self.collect {
                if let Ok(mut v) = out.try_borrow_mut() {
                    v.push(h & mask);
                }
            }
        } else if let Some(w) = self.table.get(h as usize & self.mask) {
            self.sum += *w;
        }
    }

    /// The word read so far (if any) ends: its n-grams, and whether it is a cue word.
    #[inline(always)]
    fn end_word(&mut self) {
        if self.wlen != 0 {
            self.word_ends();
        }
    }

    #[inline(always)]
    fn word_ends(&mut self) {
        let w = mix(self.hash, self.pend);
        (self.hash, self.pend, self.npend, self.wlen) = (WORD_SEED, 0, 0, 0);
        self.word(w);
    }

    /// A word with hash `w` has been read: its n-grams, and whether it is a cue word.
    #[inline(always)]
    fn word(&mut self, w: u64) {
        self.hit(unigram(w));
        if self.words != 0 {
            self.hit(bigram(self.prev, w));
        }
        let (word, bit) = bloom_slot(w);
        if CUE_BLOOM[word] & bit != 0 {
            let (steps, reasoning, constraints) = cue(w, self.words, self.steps);
            self.steps = steps;
            self.f.reasoning += reasoning;
            self.f.constraints += constraints;
        }
        self.words += 1;
        self.prev = w;
    }

    /// Sum the weight of bucket `h` into `sum` (or record it, `COLLECT`).
    #[inline(always)]
    fn hit_into(&self, sum: &mut f32, h: u32) {
        if COLLECT {
            if let Some((out, mask)) = self.collect {
                if let Ok(mut v) = out.try_borrow_mut() {
                    v.push(h & mask);
                }
            }
        } else if let Some(w) = self.table.get(h as usize & self.mask) {
            *sum += *w;
        }
    }

    /// `word`, on the walk's state `s`.
    #[inline(always)]
    fn word_into(&self, s: &mut Hot, w: u64) {
        self.hit_into(&mut s.sum, unigram(w));
        if s.words != 0 {
            self.hit_into(&mut s.sum, bigram(s.prev, w));
        }
        after_word(s, w);
    }

    /// `word_into`, with the weight table and its mask in registers: `table` and `mask` must be `self.table` and
    /// `self.mask` (`weight` relies on it).
    #[inline(always)]
    fn word_fast(&self, s: &mut Hot, table: &[f32], mask: usize, w: u64) {
        if COLLECT {
            self.word_into(s, w);
            return;
        }
        s.sum += weight(table, unigram(w) as usize & mask);
        if s.words != 0 {
            s.sum += weight(table, bigram(s.prev, w) as usize & mask);
        }
        after_word(s, w);
    }

    /// `word_fast` for a word that is not the first one (`s.words != 0`), with the hash constants `k`.
    #[inline(always)]
    fn next_word_fast(&self, s: &mut Hot, table: &[f32], mask: usize, w: u64, k: Keys) {
        debug_assert!(s.words != 0);
        if COLLECT {
            self.word_into(s, w);
            return;
        }
        // `unigram(w)` and `bigram(s.prev, w)`, with the constants from `k`.
        let u = (w.wrapping_mul(k.uni) >> 32) as u32;
        let b = ((s.prev.rotate_left(17) ^ w).wrapping_mul(k.bi) >> 32) as u32;
        debug_assert_eq!((u, b), (unigram(w), bigram(s.prev, w)));
        s.sum += weight(table, u as usize & mask);
        s.sum += weight(table, b as usize & mask);
        after_word_with(s, w, u);
    }

    /// The walk's state, taken out of `self` (counters from 0) so that it stays in registers.
    #[inline(always)]
    fn take(&self) -> Hot {
        Hot {
            sum: self.sum,
            words: self.words,
            prev: self.prev,
            steps: self.steps,
            line_start: self.line_start,
            ticks: self.ticks,
            last: self.last,
            numbers: 0,
            lines: 0,
            list_items: 0,
            reasoning: 0,
            constraints: 0,
            questions: 0,
            math: 0,
            code_fences: 0,
        }
    }

    /// Put the walk's state back into `self` (adding its counters to the features).
    #[inline(always)]
    fn put(&mut self, s: &Hot) {
        (self.sum, self.words, self.prev, self.steps) = (s.sum, s.words, s.prev, s.steps);
        (self.line_start, self.ticks, self.last) = (s.line_start, s.ticks, s.last);
        self.f.numbers += s.numbers;
        self.f.lines += s.lines;
        self.f.list_items += s.list_items;
        self.f.reasoning += s.reasoning;
        self.f.constraints += s.constraints;
        self.f.questions += s.questions;
        self.f.math += s.math;
        self.f.code_fences += s.code_fences;
    }

    /// Walk `text` from `start` (no word in progress) a 64-byte block at a time, from the block's bit masks
    /// (`simd::masks`): each word start and each other byte that is no plain separator is an event, found by
    /// `trailing_zeros`; a word's end comes from the letter/digit mask and its hash from the lowercased block; the
    /// plain separators between events are skipped. `\n` escapes and other ASCII bytes are counted here. Returns
    /// where the byte loop must take over: the end of the text, a quote (the string's end), a non-ASCII byte, an
    /// escape other than `\n`, or the start of a word that goes on into one of those. Counts exactly what the
    /// byte loop would (`block_walk_matches_the_byte_loop_*` tests).
    #[inline(never)]
    fn walk(&mut self, text: &[u8], start: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        #[allow(unsafe_code)]
        // SAFETY: the walk runs only when `simd::available()` said the CPU has these features.
        unsafe {
            self.walk_x86(text, start)
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.walk_body(text, start)
    }

    /// `walk_body` built for the CPU features `simd::available` checks (BMI `tzcnt`/`blsr`/`bzhi`, `popcnt`,
    /// `lzcnt`: 25k fewer instructions per 21 KB body, callgrind). Not AVX2: the block masks stay out of line
    /// (inlined here, LLVM took them apart bit by bit: the walk grew from 327k to 630k instructions).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "bmi1,bmi2,popcnt,lzcnt")]
    fn walk_x86(&mut self, text: &[u8], start: usize) -> usize {
        self.walk_body(text, start)
    }

    #[inline(always)]
    fn walk_body(&mut self, text: &[u8], start: usize) -> usize {
        let n = text.len();
        let (table, mask) = (self.table, self.mask);
        // NOTE: the constants as opaque values: the runs then keep them instead of reloading each (`movabs`) for
        // each word, and the bloom test reuses the unigram hash (10k fewer instructions per 21 KB body, callgrind).
        let keys = std::hint::black_box(Keys {
            seed: WORD_SEED,
            mix: MIX,
            uni: UNI,
            bi: BI,
        });
        debug_assert_eq!(mask, table.len() - 1);
        let mut s = self.take();
        // `ticks` and `last` describe the byte before `unit_end`: anything counted after it resets them.
        let mut unit_end = start;
        let mut base = start;
        // The block's bytes, and 8 zero bytes after them (a word's 8 bytes are read from here).
        let mut buf = [0u8; 72];
        while base < n {
            let mut m = block_masks(text, base, &mut buf);
            // The `n` of a `\n` escape is no letter (the word after it starts after it) and no event.
            let escaped_n = m.newline << 1;
            m.alnum &= !escaped_n;
            let special = !m.plain & !m.alnum & m.valid & !escaped_n;
            // Events: word starts, and the bytes that are no plain separator. A run of words goes on past `\n`
            // escapes; the other events stop it.
            let mut ev = (m.alnum & !(m.alnum << 1)) | special;
            let stops = special & !m.newline;
            if s.line_start {
                s.settle(&m, 0);
            }
            // The last byte of each word that ends inside the block before a byte that does not continue it (a
            // plain separator, another ASCII byte, a `\n` escape): not byte 63, whose word may go on.
            let clean_ends = m.alnum & !(m.alnum >> 1) & ((!m.glue | m.newline) >> 1);
            let next = loop {
                if ev == 0 {
                    break base + 64;
                }
                if s.words != 0 {
                    // The words before the next event that is no word start or `\n` escape, each ended by a plain
                    // separator or a `\n` escape: word starts and word ends in step, from the two masks. The word
                    // that reaches that event (or the block's end) takes the paths below.
                    let sp = ev & stops;
                    let mut below = sp.wrapping_sub(1) & !sp;
                    let breaks = ev & m.newline & below;
                    if breaks != 0 {
                        // A line's first word (after only spaces) that starts with a digit may be a list marker:
                        // the run stops before it. The first byte after each `\n` and the spaces that follow it
                        // (a carry through the space mask).
                        let first = m.space.wrapping_add(breaks << 2) & !m.space & m.digit & below;
                        below &= (first & first.wrapping_neg()).wrapping_sub(1);
                    }
                    let mut starts = ev & below & !m.newline;
                    let lead = starts & starts.wrapping_neg();
                    // At a line's start (only spaces before the first word), a word that starts with a digit may
                    // be a list marker: the paths below.
                    if starts != 0 && !(s.line_start && lead & m.digit != 0) {
                        let all = starts;
                        // The words before that event, and the one that reaches it if that ends cleanly.
                        let mut ends = clean_ends & below & !lead.wrapping_sub(1);
                        while ends != 0 {
                            let qi = (starts.trailing_zeros() & 63) as usize;
                            let ei = ((ends.trailing_zeros() + 1) & 63) as usize;
                            let w = block_word_hash_with(&buf, qi, ei, keys);
                            self.next_word_fast(&mut s, table, mask, w, keys);
                            starts &= starts - 1;
                            ends &= ends - 1;
                        }
                        s.numbers += (all & !starts & m.digit).count_ones();
                        let breaks = breaks & below;
                        s.lines += breaks.count_ones();
                        // A line starts after the last `\n` if only spaces follow it in the run.
                        s.line_start = breaks != 0 && {
                            let after = !(4u64 << (63 - breaks.leading_zeros())).wrapping_sub(1);
                            !m.space & below & after == 0
                        };
                        ev = starts | (ev & !below);
                        if ev == 0 {
                            break base + 64;
                        }
                    }
                }
                let q = ev.trailing_zeros();
                let qi = (q & 63) as usize;
                if m.alnum >> q & 1 != 0 {
                    // The common case: a word inside the block, ended by a byte that does not continue it (a plain
                    // separator, another ASCII byte, a `\n` escape), and no list marker to look for.
                    let len = (!m.alnum >> q).trailing_zeros();
                    let e = q + len;
                    let ei = (e & 63) as usize;
                    let first = buf[qi];
                    if e < 64 && (m.glue & !m.newline) >> e & 1 == 0 && !(s.line_start && first.is_ascii_digit()) {
                        s.line_start = false;
                        s.numbers += u32::from(first.is_ascii_digit());
                        let w = block_word_hash(&buf, qi, ei);
                        self.word_fast(&mut s, table, mask, w);
                        ev &= ev - 1;
                        continue;
                    }
                    if e >= 64 && q > 0 {
                        // The word runs past the block: the next block starts with it.
                        break base + qi;
                    }
                } else if q < 62 && m.newline >> q & 1 != 0 {
                    // A `\n` escape inside the block (the commonest one).
                    s.newline();
                    unit_end = base + qi + 2;
                    let pos = q + 2;
                    ev = (ev & (!0u64 << pos)) | (m.alnum & (1u64 << pos));
                    s.settle(&m, pos);
                    continue;
                } else if !s.line_start && buf[qi] < 0x80 && !matches!(buf[qi], b'\\' | b'\n' | b'"') {
                    // Any other ASCII byte inside a line (`?`, `-`, `/`, math, backticks): the byte loop's `unit`,
                    // on the walk's state.
                    let c = buf[qi];
                    let at = base + qi;
                    let ticks = if at == unit_end { s.ticks } else { 0 };
                    s.ticks = 0;
                    if c == b'`' {
                        if ticks == 2 {
                            s.code_fences += 1;
                        } else {
                            s.ticks = ticks + 1;
                        }
                    }
                    s.questions += u32::from(c == b'?');
                    s.math += u32::from(matches!(c, b'=' | b'^' | b'+' | b'$'));
                    s.last = c;
                    unit_end = at + 1;
                    ev &= ev - 1;
                    continue;
                }
                cold_path();
                let at = base + q as usize;
                let Some(&c) = text.get(at) else {
                    break n;
                };
                let next;
                if m.alnum >> q & 1 != 0 {
                    // A raw ASCII word: its end from the mask, or (running past the block) from 8-byte steps.
                    let e = q + (!m.alnum >> q).trailing_zeros();
                    let end = if e < 64 {
                        base + e as usize
                    } else {
                        ascii_word_end(text, base + 64)
                    };
                    if let Some(&t) = text.get(end) {
                        if t >= 0x80 || (t == b'\\' && text.get(end + 1) != Some(&b'n')) {
                            // The word goes on into a non-ASCII byte or an escape.
                            if at != unit_end {
                                (s.ticks, s.last) = (0, 0);
                            }
                            self.put(&s);
                            return at;
                        }
                    }
                    if s.line_start {
                        s.line_start = false;
                        if c.is_ascii_digit() && is_list_marker(&text[at..]) {
                            s.list_items += 1;
                        }
                    }
                    s.numbers += u32::from(c.is_ascii_digit());
                    self.word_fast(&mut s, table, mask, span_hash(text, at, end));
                    next = end;
                } else {
                    if at != unit_end {
                        (s.ticks, s.last) = (0, 0);
                    }
                    if c == b'\\' && text.get(at + 1) == Some(&b'n') {
                        s.newline();
                        next = at + 2;
                    } else if c >= 0x80 || c == b'\\' || c == b'"' {
                        // Non-ASCII, an escape, or the string's end: the byte loop's.
                        self.put(&s);
                        return at;
                    } else {
                        // Any other ASCII byte: the byte loop's own step.
                        self.put(&s);
                        self.unit(c, &text[at..]);
                        s = self.take();
                        next = at + 1;
                    }
                    unit_end = next;
                }
                if next - base >= 64 {
                    break next;
                }
                #[expect(clippy::cast_possible_truncation, reason = "below 64")]
                let pos = (next - base) as u32;
                // Counted up to `pos`; a letter or digit there starts a word (after a `\n` escape, say).
                ev = (ev & (!0u64 << pos)) | (m.alnum & (1u64 << pos));
                if s.line_start {
                    s.settle(&m, pos);
                }
            };
            base = next;
        }
        if n != unit_end {
            (s.ticks, s.last) = (0, 0);
        }
        self.put(&s);
        n
    }

    /// Count `text` up to its first unescaped quote, and return that quote's offset (`text.len()` without one; see
    /// `Features::observe`).
    #[inline(always)]
    fn run(&mut self, text: &[u8]) -> usize {
        let n = text.len();
        let mut i = 0;
        while i < n {
            let mut b = text[i];
            if self.simd && self.wlen == 0 && b < 0x80 && !matches!(b, b'\\' | b'"') && i >= self.rest_until {
                // The block walk goes as far as it can; the byte it stops at (if any) takes the paths below. A walk
                // that stops within a few bytes (text in another script, say) pays its block masks for little: the
                // byte loop then goes on alone for the next 256 bytes.
                let from = i;
                i = self.walk(text, i);
                if i - from < 4 {
                    self.rest_until = i + 256;
                }
                match text.get(i) {
                    Some(&c) => b = c,
                    None => break,
                }
            }
            if b == b'"' {
                // The string's end (an escaped quote is read with its backslash below).
                break;
            }
            if self.wlen == 0 && ALNUM[usize::from(b)] {
                // A raw ASCII word starts: hash it 8 bytes at a time. While words are separated by plain
                // separators (most prose), go on from word to word in this loop; a `\n` escape ends it too.
                if self.line_start {
                    self.line_start = false;
                    if is_list_marker(&text[i..]) {
                        self.f.list_items += 1;
                    }
                }
                self.ticks = 0;
                self.last = b;
                loop {
                    let mut x = load8(text, i);
                    let mut stop = !alnum_bytes(x) & HIGH;
                    if stop & 0x80 != 0 {
                        // No word here: skip another plain separator (0 past the end is none), or leave.
                        if PLAIN_SEP[usize::from(x as u8)] {
                            i += 1;
                            while text.get(i).is_some_and(|&c| PLAIN_SEP[usize::from(c)]) {
                                i += 1;
                            }
                            continue;
                        }
                        break;
                    }
                    if (x as u8).is_ascii_digit() {
                        self.f.numbers += 1;
                    }
                    let mut h = WORD_SEED;
                    let mut len = 0u32;
                    while stop == 0 {
                        h = mix(h, x | CASE);
                        i += 8;
                        len += 8;
                        x = load8(text, i);
                        stop = !alnum_bytes(x) & HIGH;
                    }
                    let k = stop.trailing_zeros() / 8;
                    i += k as usize;
                    let pend = (x | CASE) & ((1u64 << (8 * k)) - 1);
                    // The byte after the word (0 past the end of the text).
                    let c = (x >> (8 * k)) as u8;
                    if c == b'\\' && text.get(i + 1) == Some(&b'n') {
                        // A line break (the commonest escape): the word ends, a line starts.
                        self.word(mix(h, pend));
                        self.f.lines += 1;
                        self.line_start = true;
                        self.last = b'\n';
                        i += 2;
                        break;
                    }
                    if c >= 0x80 || c == b'\\' {
                        // The word goes on into a non-ASCII byte or an escape: the slow paths below.
                        (self.hash, self.pend, self.npend, self.wlen) = (h, pend, k, len + k);
                        break;
                    }
                    self.word(mix(h, pend));
                    // A plain separator (line_start is false here); then most often the next word.
                    if !PLAIN_SEP[usize::from(c)] {
                        break;
                    }
                    i += 1;
                }
                continue;
            }
            if PLAIN_SEP[usize::from(b)] && (b != b' ' || !self.line_start) {
                self.end_word();
                self.line_start = false;
                self.ticks = 0;
                self.last = b;
                i += 1;
                continue;
            }
            if b != b'\\' {
                self.unit(b, &text[i..]);
                i += 1;
                continue;
            }
            match text.get(i + 1).copied() {
                Some(b'u') => match hex4(&text[(i + 2).min(n)..]) {
                    Some(cp) => {
                        let mut utf8 = [0u8; 4];
                        let s: &[u8] = match char::from_u32(cp) {
                            Some(ch) => ch.encode_utf8(&mut utf8).as_bytes(),
                            None => b"\xef\xbf\xbd", // a lone surrogate: U+FFFD
                        };
                        for &c in s {
                            self.unit(c, &[]);
                        }
                        i += 6;
                    }
                    None => {
                        self.unit(b' ', &[]);
                        i += 2;
                    }
                },
                Some(b'n') => {
                    self.unit(b'\n', &[]);
                    i += 2;
                }
                Some(c @ (b'"' | b'\\' | b'/')) => {
                    self.unit(c, &[]);
                    i += 2;
                }
                _ => {
                    self.unit(b' ', &[]);
                    i += 2;
                }
            }
        }
        self.end_word();
        self.f.gram_hits = self
            .f
            .gram_hits
            .saturating_add(self.words.saturating_mul(2).saturating_sub(1));
        self.f.words += self.words;
        self.f.gram_sum += self.sum;
        i.min(n)
    }
}

/// The letter/digit, digit, plain-separator, space, glue and `\n`-escape bits of 64 bytes of text (bit `k`: byte
/// `k`), and which of the 64 bytes are text (all but at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Masks {
    alnum: u64,
    plain: u64,
    space: u64,
    /// Bytes that a word goes on into: non-ASCII bytes and backslashes.
    glue: u64,
    /// Backslashes followed by an `n` within the block (a `\n` escape where the backslash is not itself escaped).
    newline: u64,
    /// ASCII digits.
    digit: u64,
    valid: u64,
}

/// After a word's n-gram weights: count it, keep it for the next bigram, and look it up among the cue words.
#[inline(always)]
fn after_word(s: &mut Hot, w: u64) {
    after_word_with(s, w, unigram(w));
}

/// `after_word`, with the word's unigram hash `u` (`unigram(w)`) already computed.
#[inline(always)]
fn after_word_with(s: &mut Hot, w: u64, u: u32) {
    let (word, bit) = bloom_bit(u);
    if CUE_BLOOM[word] & bit != 0 {
        let (steps, reasoning, constraints) = cue(w, s.words, s.steps);
        s.steps = steps;
        s.reasoning += reasoning;
        s.constraints += constraints;
    }
    s.words += 1;
    s.prev = w;
}

/// The state `Observer::walk` keeps in registers: the observer's word and line state, and counters to add to the
/// features when it is put back.
#[derive(Debug, Clone, Copy)]
struct Hot {
    sum: f32,
    words: u32,
    prev: u64,
    steps: Steps,
    line_start: bool,
    ticks: u32,
    last: u8,
    numbers: u32,
    lines: u32,
    list_items: u32,
    reasoning: u32,
    constraints: u32,
    questions: u32,
    math: u32,
    code_fences: u32,
}

impl Hot {
    /// A `\n` escape: a line break, and a line starts.
    #[inline(always)]
    fn newline(&mut self) {
        self.lines += 1;
        self.line_start = true;
        (self.ticks, self.last) = (0, b'\n');
    }

    /// At a line's start, with every byte before offset `pos` of the block counted: spaces keep the line's start,
    /// the first other plain separator ends it (no list marker starts with one).
    #[inline(always)]
    fn settle(&mut self, m: &Masks, pos: u32) {
        let q = (!m.space & (!0u64 << pos)).trailing_zeros();
        if q < 64 && m.plain >> q & 1 != 0 {
            self.line_start = false;
        }
    }
}

/// `Masks` of the 64 bytes of `text` at `base`, whose copy with ASCII letters lowercased goes to `buf[..64]`
/// (zero-padded past the text's end: a zero byte is in no mask).
#[inline(always)]
fn block_masks(text: &[u8], base: usize, buf: &mut [u8; 72]) -> Masks {
    let rest = text.get(base..).unwrap_or_default();
    if let Some(block) = rest.first_chunk::<64>() {
        return simd::masks(block, buf);
    }
    let mut block = [0u8; 64];
    block[..rest.len()].copy_from_slice(rest);
    let mut m = simd::masks(&block, buf);
    m.valid = (1u64 << rest.len()) - 1;
    m
}

/// `Masks` a byte at a time, and the block lowercased into `out[..64]`: the reference for `simd::masks`, and what it
/// is on other CPUs.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn masks_portable(block: &[u8; 64], out: &mut [u8; 72]) -> Masks {
    let mut m = Masks {
        alnum: 0,
        plain: 0,
        space: 0,
        glue: 0,
        newline: 0,
        digit: 0,
        valid: !0,
    };
    for (k, &b) in block.iter().enumerate() {
        out[k] = if ALNUM[usize::from(b)] {
            b.to_ascii_lowercase()
        } else {
            b
        };
        m.glue |= u64::from(b >= 0x80 || b == b'\\') << k;
        m.newline |= u64::from(b == b'\\' && k < 63 && block[k + 1] == b'n') << k;
        m.alnum |= u64::from(ALNUM[usize::from(b)]) << k;
        m.plain |= u64::from(PLAIN_SEP[usize::from(b)]) << k;
        m.space |= u64::from(b == b' ') << k;
        m.digit |= u64::from(b.is_ascii_digit()) << k;
    }
    m
}

/// `table[k]` for `k = h & mask`, where `mask = table.len() - 1` (`Observer::new`; the table is never empty).
#[inline(always)]
#[allow(unsafe_code)]
fn weight(table: &[f32], k: usize) -> f32 {
    debug_assert!(k < table.len());
    // SAFETY: `k` is a hash masked with `table.len() - 1` (the observer's `mask`, set from this table, which is
    // `NO_WEIGHTS` or a non-empty `Grams::Weights` table), so `k <= table.len() - 1`. Measured: the two bounds
    // checks per word were ~4 of the walk's ~76 instructions per word.
    unsafe { *table.get_unchecked(k) }
}

/// Marks the branch that calls it as rarely taken (so that the walk's hot loop keeps its state in registers).
#[cold]
#[inline(never)]
const fn cold_path() {}

/// The 8 bytes of a block buffer at `j` (< 64), little-endian.
#[inline(always)]
fn load_block(buf: &[u8; 72], j: usize) -> u64 {
    let mut b = [0u8; 8];
    let j = j & 63;
    b.copy_from_slice(&buf[j..j + 8]);
    u64::from_le_bytes(b)
}

/// The hash constants as values: the walk takes them once through `black_box`, so that its runs keep them (in
/// registers or on the stack) instead of reloading each 64-bit constant for each word.
#[derive(Clone, Copy)]
struct Keys {
    seed: u64,
    mix: u64,
    uni: u64,
    bi: u64,
}

/// `block_word_hash` with the constants `k` (which equal `WORD_SEED`, `MIX`, `UNI` and `BI`).
#[inline(always)]
fn block_word_hash_with(buf: &[u8; 72], mut s: usize, e: usize, k: Keys) -> u64 {
    let mix = |h: u64, chunk: u64| (h ^ chunk).wrapping_mul(k.mix).rotate_left(32);
    let mut h = k.seed;
    while e - s >= 8 {
        h = mix(h, load_block(buf, s));
        s += 8;
    }
    mix(h, load_block(buf, s) & ((1u64 << (8 * (e - s))) - 1))
}

/// `word_hash` of the raw ASCII word `buf[s..e]` of a block buffer, lowercased (`s < e < 64`: letters and digits
/// only).
#[inline(always)]
fn block_word_hash(buf: &[u8; 72], mut s: usize, e: usize) -> u64 {
    let mut h = WORD_SEED;
    while e - s >= 8 {
        h = mix(h, load_block(buf, s));
        s += 8;
    }
    mix(h, load_block(buf, s) & ((1u64 << (8 * (e - s))) - 1))
}

/// The end of the raw ASCII word that runs on from `j`: the first byte from `j` on that is no letter or digit.
#[inline(always)]
fn ascii_word_end(text: &[u8], mut j: usize) -> usize {
    loop {
        let stop = !alnum_bytes(load8(text, j)) & HIGH;
        if stop != 0 {
            return j + (stop.trailing_zeros() / 8) as usize;
        }
        j += 8;
    }
}

/// `word_hash` of the raw ASCII word `text[s..e]` (letters and digits only).
#[inline(always)]
fn span_hash(text: &[u8], mut s: usize, e: usize) -> u64 {
    let mut h = WORD_SEED;
    while e - s >= 8 {
        h = mix(h, load8(text, s) | CASE);
        s += 8;
    }
    let k = e - s;
    mix(h, (load8(text, s) | CASE) & ((1u64 << (8 * k)) - 1))
}

/// The block masks with AVX2 (runtime-detected). Each set is looked up by nibbles: the low nibble picks a byte
/// whose bit `h` says whether `h << 4 | low` is in the set (ASCII rows `h` 0..8), the high nibble picks `1 << h`
/// (0 for non-ASCII bytes).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::{
        __m256i, _mm256_and_si256, _mm256_andnot_si256, _mm256_cmpeq_epi8, _mm256_cmpgt_epi8, _mm256_loadu_si256,
        _mm256_movemask_epi8, _mm256_or_si256, _mm256_set1_epi8, _mm256_setr_epi8, _mm256_setzero_si256,
        _mm256_shuffle_epi8, _mm256_srli_epi16, _mm256_storeu_si256,
    };

    use super::{Masks, ALNUM, PLAIN_SEP};

    /// Whether the CPU has AVX2, and BMI1, BMI2, POPCNT and LZCNT for the walk (every AVX2 CPU has them; cached by
    /// std after the first call).
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("bmi1")
            && std::arch::is_x86_feature_detected!("bmi2")
            && std::arch::is_x86_feature_detected!("popcnt")
            && std::arch::is_x86_feature_detected!("lzcnt")
    }

    /// For each low nibble, the rows (high nibbles 0..8) whose byte is in `set`.
    const fn rows(set: &[bool; 256]) -> [u8; 16] {
        let mut t = [0u8; 16];
        let mut b = 0;
        while b < 128 {
            if set[b] {
                t[b & 15] |= 1 << (b >> 4);
            }
            b += 1;
        }
        t
    }
    const ALNUM_ROWS: [u8; 16] = rows(&ALNUM);
    const PLAIN_ROWS: [u8; 16] = rows(&PLAIN_SEP);
    const ROW_BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 0, 0, 0, 0, 0, 0, 0, 0];

    /// A 16-byte table in both 128-bit lanes (shuffles work per lane).
    #[target_feature(enable = "avx2")]
    fn table(t: &[u8; 16]) -> __m256i {
        let b = t.map(|x| x.cast_signed());
        _mm256_setr_epi8(
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15], b[0],
            b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15],
        )
    }

    /// `Masks` of `block`, and `block` lowercased into `out[..64]`: equal to `masks_portable`.
    #[inline]
    pub(super) fn masks(block: &[u8; 64], out: &mut [u8; 72]) -> Masks {
        debug_assert!(available());
        // SAFETY: AVX2 is present: every `Observer` with `simd` set checked `available()` first (and the tests
        // call this only after it).
        unsafe { masks_avx2(block, out) }
    }

    #[target_feature(enable = "avx2")]
    fn masks_avx2(block: &[u8; 64], out: &mut [u8; 72]) -> Masks {
        let (alnum_t, plain_t, row_t) = (table(&ALNUM_ROWS), table(&PLAIN_ROWS), table(&ROW_BIT));
        let (nibble, space, zero) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x20), _mm256_setzero_si256());
        let (backslash, letter_n) = (
            _mm256_set1_epi8(b'\\'.cast_signed()),
            _mm256_set1_epi8(b'n'.cast_signed()),
        );
        let (below_0, above_9) = (
            _mm256_set1_epi8((b'0' - 1).cast_signed()),
            _mm256_set1_epi8((b'9' + 1).cast_signed()),
        );
        // Bits of the 32 bytes at `half` that are *not* in each set; the 32 bytes lowercased go to `out`.
        let mut half = |half: usize| {
            // SAFETY: `block` holds 64 bytes and `half` is 0 or 32: 32 readable bytes; the load is unaligned.
            let v = unsafe { _mm256_loadu_si256(block.as_ptr().add(half).cast()) };
            let row = _mm256_shuffle_epi8(row_t, _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble));
            // A shuffle index with its top bit set (a non-ASCII byte) gives 0; the low nibble picks the entry.
            let not_in = |t| _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(t, v), row), zero);
            let not = |t| _mm256_movemask_epi8(not_in(t));
            let not_alnum = not_in(alnum_t);
            // Letters and digits get bit 0x20 (lowercase letters; digits have it).
            let lower = _mm256_or_si256(v, _mm256_andnot_si256(not_alnum, space));
            // SAFETY: `out` holds 72 bytes: 32 writable bytes at `half`; the store is unaligned.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(half).cast(), lower) };
            let is_space = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, space));
            let is_backslash = _mm256_cmpeq_epi8(v, backslash);
            let glue = _mm256_movemask_epi8(_mm256_or_si256(v, is_backslash));
            let is_n = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, letter_n));
            // Signed: non-ASCII bytes are below `'0'`.
            let is_digit = _mm256_movemask_epi8(_mm256_and_si256(
                _mm256_cmpgt_epi8(v, below_0),
                _mm256_cmpgt_epi8(above_9, v),
            ));
            (
                _mm256_movemask_epi8(not_alnum).cast_unsigned(),
                not(plain_t).cast_unsigned(),
                is_space.cast_unsigned(),
                glue.cast_unsigned(),
                _mm256_movemask_epi8(is_backslash).cast_unsigned(),
                is_n.cast_unsigned(),
                is_digit.cast_unsigned(),
            )
        };
        let (a0, p0, s0, g0, b0, n0, d0) = half(0);
        let (a1, p1, s1, g1, b1, n1, d1) = half(32);
        let join = |lo: u32, hi: u32| u64::from(lo) | u64::from(hi) << 32;
        Masks {
            alnum: !join(a0, a1),
            plain: !join(p0, p1),
            space: join(s0, s1),
            glue: join(g0, g1),
            newline: join(b0, b1) & join(n0, n1) >> 1,
            digit: join(d0, d1),
            valid: !0,
        }
    }
}

/// Without AVX2: the portable masks (never used by `observe`, which walks bytes instead).
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::{masks_portable, Masks};

    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn masks(block: &[u8; 64], out: &mut [u8; 72]) -> Masks {
        masks_portable(block, out)
    }
}

/// "step by step" in progress, by word index (so that a word that is no cue word changes nothing): `by` is the
/// index a "by" must have to follow a "step", `step` the index a "step" must have to follow "step by".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Steps {
    by: u32,
    step: u32,
}

impl Steps {
    /// Nothing in progress (no word has this index).
    const NONE: Self = Self {
        by: u32::MAX,
        step: u32::MAX,
    };
}

/// A word that passed the bloom filter, the `i`th of its string, after `steps`: the next `steps`, and the reasoning
/// and constraint cues it adds. Out of line, and no reference to the observer, so the observer's state stays in
/// registers.
#[inline(never)]
fn cue(w: u64, i: u32, steps: Steps) -> (Steps, u32, u32) {
    let next = i.wrapping_add(1);
    if w == STEP {
        (Steps { by: next, ..steps }, u32::from(steps.step == i), 0)
    } else if w == BY {
        let step = if steps.by == i { next } else { steps.step };
        (Steps { step, ..steps }, 0, 0)
    } else if REASONING_HASHES.contains(&w) {
        (steps, 1, 0)
    } else {
        (steps, 0, u32::from(CONSTRAINT_HASHES.contains(&w)))
    }
}

fn hex4(b: &[u8]) -> Option<u32> {
    let s = b.get(..4)?;
    let mut v = 0u32;
    for &c in s {
        v = (v << 4) | char::from(c).to_digit(16)?;
    }
    Some(v)
}

impl Features {
    /// Add the features of one text string: raw JSON string content from its first byte, up to its first
    /// unescaped quote (the string's end; the end of `text` without one), whose offset is returned. Escapes are
    /// decoded here, so `\n`, `\u00e9` and a literal `é` count alike. Linear in the string: a raw ASCII word is
    /// classified and hashed 8 bytes at a time; each word ends in two `grams` hits (one for the first word of the
    /// string) and one bloom filter lookup for the cue words. Non-ASCII text and escapes take a byte-at-a-time path.
    /// Nothing is validated: the body scan has accepted the string before.
    pub fn observe(&mut self, text: &[u8], grams: Grams<'_>) -> usize {
        self.observe_with(text, grams, true)
    }

    /// `observe`, with the AVX2 block walk (when `simd` and the CPU has it) or the portable byte loop alone: both
    /// count exactly the same features and n-grams.
    fn observe_with(&mut self, text: &[u8], grams: Grams<'_>, simd: bool) -> usize {
        let simd = simd && simd::available();
        let len = match grams {
            Grams::Collect(out, mask) => Observer::<true>::new(self, &NO_WEIGHTS, Some((out, mask)), simd).run(text),
            Grams::Weights(t) if !t.is_empty() => Observer::<false>::new(self, t, None, simd).run(text),
            _ => Observer::<false>::new(self, &NO_WEIGHTS, None, simd).run(text),
        };
        self.bytes = self.bytes.saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
        len
    }

    /// The dense feature vector a trained model weighs, in `DENSE_FEATURES` order.
    #[must_use]
    #[expect(
        clippy::cast_precision_loss,
        reason = "counts far below 2^24 matter; larger ones are logged"
    )]
    pub fn dense(&self, tokens: u32) -> [f32; DENSE] {
        let ln = |v: u32| (v as f32).ln_1p();
        let words = self.words as f32 + 1.0;
        let chars = (self.bytes as f32).max(1.0);
        [
            ln(tokens),
            ln(self.bytes),
            ln(self.words),
            ln(self.lines),
            ln(self.turns),
            ln(self.system_bytes),
            ln(self.code_fences.div_ceil(2)),
            ln(self.math),
            (self.math as f32 / words).min(4.0),
            ln(self.numbers),
            self.numbers as f32 / words,
            ln(self.questions),
            ln(self.reasoning),
            ln(self.constraints),
            ln(self.list_items),
            (self.non_ascii as f32 / chars).min(1.0),
        ]
    }
}

fn is_list_marker(s: &[u8]) -> bool {
    match s {
        [b'-' | b'*', b' ', ..] => true,
        [d, rest @ ..] if d.is_ascii_digit() => {
            let n = rest.iter().take_while(|c| c.is_ascii_digit()).count();
            matches!(rest.get(n), Some(b'.' | b')')) && matches!(rest.get(n + 1), Some(b' '))
        }
        _ => false,
    }
}

/// Number of dense features.
pub const DENSE: usize = 16;

/// The dense features, in order: what a model file's `features` must list.
pub const DENSE_FEATURES: [&str; DENSE] = [
    "ln_tokens",
    "ln_bytes",
    "ln_words",
    "ln_lines",
    "ln_turns",
    "ln_system_bytes",
    "ln_code_blocks",
    "ln_math",
    "math_per_word",
    "ln_numbers",
    "numbers_per_word",
    "ln_questions",
    "ln_reasoning",
    "ln_constraints",
    "ln_list_items",
    "non_ascii_share",
];

/// The model file format name and the version this build reads.
pub const MODEL_FORMAT: &str = "fastroute-classifier";
/// See [`MODEL_FORMAT`].
pub const MODEL_VERSION: u32 = 2;
/// Smallest and largest n-gram table (log2 of its length).
pub const HASH_BITS: std::ops::RangeInclusive<u32> = 8..=22;

/// The fields of a model file this module reads (other keys are metadata, ignored here).
#[derive(Debug, Deserialize)]
struct ModelFile {
    format: String,
    version: u32,
    features: Vec<String>,
    hash_bits: u32,
    bias: f64,
    dense: Vec<f64>,
    ngrams: Vec<f64>,
}

/// A trained logistic model: `z = bias + dense · x + Σ ngram weights / √hits`, score `σ(z)`.
#[derive(Debug, Clone)]
pub struct Scorer {
    bias: f32,
    dense: [f32; DENSE],
    ngrams: Box<[f32]>,
    hash_bits: u32,
}

#[expect(clippy::cast_possible_truncation, reason = "weights are stored as f32")]
fn finite(v: f64, what: &str) -> Result<f32, String> {
    if v.is_finite() && v.abs() < 1e6 {
        Ok(v as f32)
    } else {
        Err(format!("{what} is not a finite weight ({v})"))
    }
}

impl Scorer {
    /// Read and check a model file's JSON. Runs once per compile.
    ///
    /// # Errors
    /// Not JSON of the model shape, another format or version, features other than this build's,
    /// a table whose length is not `2^hash_bits`, or a weight that is not finite.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let m: ModelFile = serde_json::from_slice(bytes).map_err(|e| format!("not a classifier model file: {e}"))?;
        if m.format != MODEL_FORMAT {
            return Err(format!("`format` is `{}`, expected `{MODEL_FORMAT}`", m.format));
        }
        if m.version != MODEL_VERSION {
            return Err(format!(
                "model version {} but this fastroute reads version {MODEL_VERSION}; retrain it with `fastroute train`",
                m.version
            ));
        }
        if m.features != DENSE_FEATURES {
            return Err(format!(
                "the model was trained on features {:?}, this fastroute computes {DENSE_FEATURES:?}; retrain it \
                 with `fastroute train`",
                m.features
            ));
        }
        if m.dense.len() != DENSE {
            return Err(format!("`dense` has {} weights, expected {DENSE}", m.dense.len()));
        }
        if !HASH_BITS.contains(&m.hash_bits) {
            return Err(format!(
                "`hash_bits` is {}, expected {}..={}",
                m.hash_bits,
                HASH_BITS.start(),
                HASH_BITS.end()
            ));
        }
        let n = 1usize << m.hash_bits;
        if m.ngrams.len() != n {
            return Err(format!(
                "`ngrams` has {} weights, expected 2^hash_bits = {n}",
                m.ngrams.len()
            ));
        }
        let mut dense = [0f32; DENSE];
        for (i, (d, v)) in dense.iter_mut().zip(&m.dense).enumerate() {
            *d = finite(*v, &format!("dense[{i}]"))?;
        }
        let ngrams = m
            .ngrams
            .iter()
            .enumerate()
            .map(|(i, v)| finite(*v, &format!("ngrams[{i}]")))
            .collect::<Result<Box<[f32]>, _>>()?;
        Ok(Self {
            bias: finite(m.bias, "bias")?,
            dense,
            ngrams,
            hash_bits: m.hash_bits,
        })
    }

    /// What `observe` should do with n-grams for this model.
    #[must_use]
    pub fn grams(&self) -> Grams<'_> {
        Grams::Weights(&self.ngrams)
    }

    /// log2 of the n-gram table length.
    #[must_use]
    pub fn hash_bits(&self) -> u32 {
        self.hash_bits
    }

    /// The score in [0, 1] of features observed with `self.grams()`. A few dozen float ops.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "a hit count")]
    pub fn score(&self, f: &Features, tokens: u32) -> f32 {
        let x = f.dense(tokens);
        let mut z = self.bias;
        for (w, v) in self.dense.iter().zip(x) {
            z += w * v;
        }
        if f.gram_hits > 0 {
            z += f.gram_sum / (f.gram_hits as f32).sqrt();
        }
        1.0 / (1.0 + (-z).exp())
    }
}

/// The fixed weights of the built-in scorer (`score_builtin`), `z = BIAS + Σ weight · feature`:
/// - `TOKENS` per unit of `ln(1 + tokens)`: length is the strongest single signal;
/// - `QUESTIONS` per `?`, at most 4 counted;
/// - `CODE` per code block (two fences), at most 3;
/// - `MATH` per math symbol, at most 20;
/// - `REASONING` per reasoning word, at most 6;
/// - `CONSTRAINTS` per constraint word or list item, at most 12.
///
/// Set by hand so that greetings and one-line lookups score below 0.2 and multi-part design,
/// proof or code-review prompts above 0.7. Used only by a router compiled without a model file
/// (config loading always supplies one: the shipped default or the route's `classifier`).
pub mod weights {
    /// Intercept.
    pub const BIAS: f32 = -4.0;
    /// Per `ln(1 + tokens)`.
    pub const TOKENS: f32 = 0.45;
    /// Per question mark.
    pub const QUESTIONS: f32 = 0.2;
    /// Per code block.
    pub const CODE: f32 = 0.7;
    /// Per math symbol.
    pub const MATH: f32 = 0.06;
    /// Per reasoning word.
    pub const REASONING: f32 = 0.7;
    /// Per constraint word or list item.
    pub const CONSTRAINTS: f32 = 0.15;
}

/// Complexity in [0, 1] from the features and the token estimate, with the built-in weights.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "small counts, capped")]
pub fn score_builtin(f: &Features, tokens: u32) -> f32 {
    use weights as w;
    let z = w::BIAS
        + w::TOKENS * (tokens as f32).ln_1p()
        + w::QUESTIONS * f.questions.min(4) as f32
        + w::CODE * f.code_fences.div_ceil(2).min(3) as f32
        + w::MATH * f.math.min(20) as f32
        + w::REASONING * f.reasoning.min(6) as f32
        + w::CONSTRAINTS * (f.constraints + f.list_items).min(12) as f32;
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(s: &str) -> Features {
        let mut f = Features::default();
        f.observe(s.as_bytes(), Grams::Off);
        f
    }

    fn hits(s: &str, bits: u32) -> Vec<u32> {
        let out = RefCell::new(Vec::new());
        let mut f = Features::default();
        f.observe(s.as_bytes(), Grams::Collect(&out, (1 << bits) - 1));
        out.into_inner()
    }

    fn model_json(bits: u32, bias: f64, dense: &[f64], set: &[(u32, f64)]) -> Vec<u8> {
        let mut ngrams = vec![0.0; 1 << bits];
        for &(b, w) in set {
            ngrams[b as usize] = w;
        }
        serde_json::to_vec(&serde_json::json!({
            "format": MODEL_FORMAT, "version": MODEL_VERSION, "features": DENSE_FEATURES, "hash_bits": bits,
            "bias": bias, "dense": dense, "ngrams": ngrams, "metadata": {"ignored": true},
        }))
        .unwrap()
    }

    #[test]
    fn counts_features() {
        let f =
            feats("Explain, step by step, why? Prove it.\\n- must be short\\n2. never lie\\n```py\\nx = 1 + 2\\n```");
        assert_eq!(f.questions, 1);
        assert_eq!(f.code_fences, 2);
        assert_eq!(f.reasoning, 4); // explain, step-by-step, why, prove
        assert_eq!(f.constraints, 2); // must, never
        assert_eq!(f.list_items, 2);
        assert_eq!(f.math, 2);
        assert_eq!(f.lines, 5);
        assert_eq!(f.numbers, 3); // 2, 1, 2
        assert_eq!(f.words, 17);
        assert_eq!(f.gram_hits, 2 * 17 - 1);
    }

    /// A straightforward reference for `observe`: decode the escapes first, then go one decoded byte at a time,
    /// keeping each word in a buffer; hash whole words with `word_hash` and match cue words as strings.
    fn reference(text: &[u8], bits: u32) -> (Features, Vec<u32>) {
        let mut units: Vec<(u8, Option<usize>)> = Vec::new();
        let mut i = 0;
        while i < text.len() {
            if text[i] == b'"' {
                break;
            }
            if text[i] != b'\\' {
                units.push((text[i], Some(i)));
                i += 1;
                continue;
            }
            match text.get(i + 1) {
                Some(b'u') => {
                    if let Some(cp) = hex4(&text[(i + 2).min(text.len())..]) {
                        let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                        let mut b = [0u8; 4];
                        units.extend(ch.encode_utf8(&mut b).bytes().map(|c| (c, None)));
                        i += 6;
                    } else {
                        units.push((b' ', None));
                        i += 2;
                    }
                }
                Some(b'n') => {
                    units.push((b'\n', None));
                    i += 2;
                }
                Some(&c @ (b'"' | b'\\' | b'/')) => {
                    units.push((c, None));
                    i += 2;
                }
                _ => {
                    units.push((b' ', None));
                    i += 2;
                }
            }
        }
        let mut f = Features {
            bytes: u32::try_from(i.min(text.len())).unwrap(),
            ..Features::default()
        };
        let (mut words, mut word) = (Vec::<Vec<u8>>::new(), Vec::new());
        let (mut line_start, mut ticks, mut last) = (true, 0, 0u8);
        for (c, at) in units {
            let rest = at.map_or(&[][..], |at| &text[at..]);
            if c.is_ascii_alphanumeric() || c >= 0x80 {
                if line_start {
                    line_start = false;
                    f.list_items += u32::from(is_list_marker(rest));
                }
                if c >= 0xC0 {
                    f.non_ascii += 1;
                } else if last == 0xE2 && (0x88..=0x8B).contains(&c) {
                    f.math += 1;
                }
                if word.is_empty() && c.is_ascii_digit() {
                    f.numbers += 1;
                }
                word.push(c.to_ascii_lowercase());
                ticks = 0;
            } else {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                ticks = if c == b'`' { ticks + 1 } else { 0 };
                if ticks == 3 {
                    f.code_fences += 1;
                    ticks = 0;
                }
                match c {
                    b'?' => f.questions += 1,
                    b'=' | b'^' | b'+' | b'$' => f.math += 1,
                    b'\n' => {
                        f.lines += 1;
                        line_start = true;
                    }
                    _ => {}
                }
                if line_start && !matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
                    line_start = false;
                    f.list_items += u32::from(is_list_marker(rest));
                }
            }
            last = c;
        }
        if !word.is_empty() {
            words.push(word);
        }
        let mask = (1u32 << bits) - 1;
        let mut hits = Vec::new();
        for (k, w) in words.iter().enumerate() {
            let h = word_hash(w);
            hits.push(unigram(h) & mask);
            if k > 0 {
                hits.push(bigram(word_hash(&words[k - 1]), h) & mask);
            }
            if REASONING.contains(&&w[..]) {
                f.reasoning += 1;
            }
            if CONSTRAINTS.contains(&&w[..]) {
                f.constraints += 1;
            }
            if k >= 2 && w == b"step" && words[k - 1] == b"by" && words[k - 2] == b"step" {
                f.reasoning += 1;
            }
        }
        f.words = u32::try_from(words.len()).unwrap();
        f.gram_hits = u32::try_from(hits.len()).unwrap();
        (f, hits)
    }

    /// Random text from pieces that exercise every path: words of every length around the 8-byte chunks, cue
    /// words in any case, separators, escapes (valid, invalid, surrogates), raw UTF-8, list markers, fences.
    fn random_text(seed: &mut u64) -> String {
        const PIECES: &[&str] = &[
            "a",
            "Z",
            "q",
            "7",
            "0",
            "42",
            "word",
            "Hello",
            "STEP",
            "step",
            "by",
            "By",
            "explain",
            "Must",
            "never",
            "requires",
            "architecture",
            "tradeoffs",
            "abcdefg",
            "abcdefgh",
            "abcdefghi",
            "ABCDEFGHIJKLMNOPQ",
            "x1y2z3w4v5",
            " ",
            " ",
            " ",
            "  ",
            ",",
            ".",
            ";",
            "?",
            "=",
            "+",
            "^",
            "$",
            "%",
            "`",
            "```",
            "-",
            "*",
            "\\n",
            "\\t",
            "\\\"",
            "\\\\",
            "\\/",
            "\\u00e9",
            "\\u00E9",
            "\\u0041",
            "\\u004a",
            "\\u0020",
            "\\u2211",
            "\\ud800",
            "\\uzz12",
            "\\u12",
            "\\",
            "é",
            "∑",
            "日本",
            "−",
            "- ",
            "* ",
            "1. ",
            "12) ",
            "3.",
            "\n",
            "\t",
            "@",
            "_",
            "~",
            "\u{7f}",
            "\u{1}",
        ];
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let n = next() % 40;
        (0..n)
            .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
            .collect()
    }

    #[test]
    fn observe_matches_the_reference_on_random_text() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let text = random_text(&mut seed);
            let (want, want_hits) = reference(text.as_bytes(), 12);
            let got_hits = hits(&text, 12);
            let got = feats(&text);
            assert_eq!(got, want, "{text:?}");
            assert_eq!(got_hits, want_hits, "{text:?}");
        }
    }

    /// Features and n-gram hits of `text` by the block walk and by the byte loop alone, which must agree exactly
    /// (also the weight sum, summed in the same order).
    fn walk_agrees(text: &[u8]) {
        let table: Vec<f32> = (0..1u32 << 10).map(|i| (i as f32 * 0.618).sin()).collect();
        let run = |simd: bool| {
            let out = RefCell::new(Vec::new());
            let mut f = Features::default();
            f.observe_with(text, Grams::Collect(&out, (1 << 20) - 1), simd);
            let mut w = Features::default();
            w.observe_with(text, Grams::Weights(&table), simd);
            (f, out.into_inner(), w)
        };
        let (walked, scalar) = (run(true), run(false));
        assert_eq!(walked.0, scalar.0, "{:?}", String::from_utf8_lossy(text));
        assert_eq!(walked.1, scalar.1, "{:?}", String::from_utf8_lossy(text));
        assert_eq!(
            walked.2.gram_sum.to_bits(),
            scalar.2.gram_sum.to_bits(),
            "{:?}",
            String::from_utf8_lossy(text)
        );
    }

    #[test]
    fn simd_masks_match_the_portable_masks() {
        if !simd::available() {
            return;
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..20_000 {
            let mut block = [0u8; 64];
            for (k, b) in block.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Every byte value at every position, then random bytes.
                *b = if round < 256 {
                    ((round + k) % 256) as u8
                } else {
                    (x >> 24) as u8
                };
            }
            let (mut out, mut want) = ([0u8; 72], [0u8; 72]);
            assert_eq!(
                simd::masks(&block, &mut out),
                masks_portable(&block, &mut want),
                "{block:?}"
            );
            assert_eq!(out, want, "{block:?}");
        }
        // `\n` escapes (and escaped backslashes before an `n`) at every offset, also across the two halves and at
        // the block's last byte.
        let text = b"ab\\n\\\\n \\nn\\\\\\n\\";
        for off in 0..text.len() {
            let mut block = [0u8; 64];
            for (k, b) in block.iter_mut().enumerate() {
                *b = text[(k + off) % text.len()];
            }
            let (mut out, mut want) = ([0u8; 72], [0u8; 72]);
            let m = simd::masks(&block, &mut out);
            assert_eq!(m, masks_portable(&block, &mut want), "{block:?}");
            assert_eq!(out, want, "{block:?}");
            assert_ne!(m.newline, 0);
        }
    }

    #[test]
    fn block_walk_matches_the_byte_loop_on_random_text() {
        let mut seed = 0x5851_f42d_4c95_7f2du64;
        for _ in 0..3_000 {
            // Several pieces of random text: a few hundred bytes, across several blocks.
            let text: String = (0..(seed % 12 + 1)).map(|_| random_text(&mut seed)).collect();
            walk_agrees(text.as_bytes());
        }
    }

    #[test]
    fn block_walk_matches_the_byte_loop_around_block_edges() {
        let pieces: [&[u8]; 8] = [
            b" ",
            b"\\n",
            b"\\u00e9",
            b"\\\"",
            "é".as_bytes(),
            b"?",
            b"\\n- ",
            b"\\n12. ",
        ];
        for (pad, word) in (0..72).flat_map(|pad| [(pad, b"aZ7q"), (pad, b"7qaZ")]) {
            for len in [1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 70, 130] {
                for after in pieces {
                    for before in pieces {
                        let mut text = b"x ".repeat(pad / 2);
                        text.extend_from_slice(&b"y"[..pad % 2]);
                        text.extend_from_slice(before);
                        text.extend((0..len).map(|k| word[k % 4]));
                        text.extend_from_slice(after);
                        text.extend_from_slice(b"tail words here");
                        for cut in [text.len(), text.len() - 5, pad + before.len() + len] {
                            walk_agrees(&text[..cut]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn block_walk_matches_the_byte_loop_on_runs_of_short_words() {
        // Many words per block (the walk takes the words before each event in one run), each followed by a
        // separator or an event: words of 1 to 16 bytes, some starting with a digit, `\n` escapes (which a run goes
        // past), line starts with and without list markers, after spaces or not, an escaped backslash before an `n`,
        // other escapes and non-ASCII bytes right after a word; at every offset.
        let words: [&[u8]; 8] = [
            b"a",
            b"Ok",
            b"7",
            b"1234567",
            b"Abcdefgh",
            b"x1y2z3w4v",
            b"9lives",
            b"Sixteen0bytes00X",
        ];
        let seps: [&[u8]; 18] = [
            b" ",
            b" ",
            b", ",
            b"\\n",
            b"\\n\\n",
            b"?",
            b"\\n- ",
            b"\\n2. ",
            "é".as_bytes(),
            b"\\\"",
            b"  ",
            b"-",
            b"\\n  ",
            b"\\n (",
            b"\\n 4) ",
            b"\\n\\n  ",
            b"\\\\n",
            b"\\n.",
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..400 {
            let mut text = Vec::new();
            while text.len() < 300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                text.extend_from_slice(words[(x % 8) as usize]);
                text.extend_from_slice(seps[(x >> 8) as usize % seps.len()]);
            }
            for off in 0..66 {
                walk_agrees(&text[off..]);
            }
        }
    }

    #[test]
    fn block_walk_matches_the_byte_loop_on_the_training_prompts() {
        let path =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/fastroute/data/routing/mmlu-train.jsonl");
        let data = std::fs::read_to_string(path).unwrap();
        let mut all = Vec::new();
        for line in data.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            // The prompt as raw JSON string content, escapes and all.
            let raw = serde_json::to_string(&v["prompt"]).unwrap();
            let raw = raw.as_bytes()[1..raw.len() - 1].to_vec();
            walk_agrees(&raw);
            all.extend_from_slice(&raw);
            all.extend_from_slice(b"\\n\\n");
        }
        walk_agrees(&all[..all.len().min(300_000)]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn block_walk_matches_the_byte_loop_on_any_text(text in "[a-zA-Z0-9 ,.:()\\-*?=`\\\\nu\"é∑\t\n]{0,300}") {
            walk_agrees(text.as_bytes());
        }

        #[test]
        fn block_walk_matches_the_byte_loop_on_any_bytes(text in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            walk_agrees(&text);
        }
    }

    #[test]
    fn weights_sum_the_buckets_the_reference_hits() {
        let bits = 10;
        let table: Vec<f32> = (0..1u32 << bits)
            .map(|i| f32::from(u16::try_from(i % 97).unwrap()) - 48.0)
            .collect();
        let mut seed = 7u64;
        for _ in 0..2_000 {
            let text = random_text(&mut seed);
            let (_, want_hits) = reference(text.as_bytes(), bits);
            let mut f = Features::default();
            f.observe(text.as_bytes(), Grams::Weights(&table));
            let want: f32 = want_hits.iter().map(|&h| table[h as usize]).sum();
            assert_eq!(f.gram_sum, want, "{text:?}");
        }
    }

    #[test]
    fn alnum_bytes_agrees_with_a_byte_test() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let want = x.to_le_bytes().iter().enumerate().fold(0u64, |m, (k, b)| {
                m | (u64::from(b.is_ascii_alphanumeric()) << (8 * k + 7))
            });
            assert_eq!(alnum_bytes(x), want, "{x:#x}");
        }
        for b in 0..=255u8 {
            assert_eq!(alnum_bytes(u64::from(b)) != 0, b.is_ascii_alphanumeric(), "{b}");
        }
    }

    #[test]
    fn short_words_never_share_a_hash() {
        let chars: Vec<u8> = (b'a'..=b'z').chain(b'0'..=b'9').collect();
        let mut seen = std::collections::HashSet::new();
        for &a in &chars {
            assert!(seen.insert(word_hash(&[a])));
            for &b in &chars {
                assert!(seen.insert(word_hash(&[a, b])));
                for &c in &chars {
                    assert!(seen.insert(word_hash(&[a, b, c])));
                }
            }
        }
        assert_eq!(word_hash(b"Hello"), word_hash(b"hello"));
        assert_ne!(word_hash(b"abcdefgh"), word_hash(b"abcdefghi"));
    }

    #[test]
    fn a_word_inside_a_line_is_no_list_marker() {
        assert_eq!(feats("Hello - world\\n- item").list_items, 1);
    }

    #[test]
    fn escapes_and_literal_text_hash_alike() {
        // (A raw quote would end the string: the escaped text's `\/` stands for the literal's `/`.)
        let literal = "Café naïve − résumé /quoted/ ∑ 日本";
        let escaped = "Caf\\u00e9 na\\u00efve \\u2212 r\\u00e9sum\\u00e9 \\/quoted\\/ \\u2211 \\u65e5\\u672c";
        assert_eq!(hits(literal, 16), hits(escaped, 16));
        let (a, b) = (feats(literal), feats(escaped));
        assert_eq!((a.words, a.non_ascii, a.math), (b.words, b.non_ascii, b.math));
        assert_eq!(a.non_ascii, 8);
        assert_eq!(a.math, 2); // − and ∑
    }

    #[test]
    fn ngrams_are_case_insensitive_and_ordered() {
        assert_eq!(hits("Hello World", 20), hits("hello world", 20));
        let ab = hits("alpha beta", 20);
        let ba = hits("beta alpha", 20);
        assert_eq!(ab.len(), 3);
        assert_eq!(ab[0], ba[1]); // the unigram "alpha"
        assert_ne!(ab[2], ba[2]); // the bigrams differ
    }

    #[test]
    fn dense_features_have_their_names() {
        let f = feats("What is 2 + 2?");
        let x = f.dense(6);
        assert_eq!(x.len(), DENSE_FEATURES.len());
        assert!((x[0] - 7f32.ln()).abs() < 1e-6);
        assert!(x.iter().all(|v| v.is_finite() && *v >= 0.0));
    }

    #[test]
    fn scorer_weighs_the_ngrams_hit() {
        let bits = 10;
        let hello = hits("hello", bits)[0];
        let neutral = Scorer::from_json(&model_json(bits, 0.0, &[0.0; DENSE], &[])).unwrap();
        let keen = Scorer::from_json(&model_json(bits, 0.0, &[0.0; DENSE], &[(hello, 2.0)])).unwrap();
        let score = |s: &Scorer, text: &str| {
            let mut f = Features::default();
            f.observe(text.as_bytes(), s.grams());
            s.score(&f, 1)
        };
        assert!((score(&neutral, "hello") - 0.5).abs() < 1e-6);
        let one = score(&keen, "hello");
        assert!((one - 1.0 / (1.0 + (-2f32).exp())).abs() < 1e-6, "{one}");
        // two hits of the same bucket: 4 / √2
        let two = score(&keen, "hello, hello");
        assert!(two > one);
        let dense = Scorer::from_json(&model_json(bits, -1.0, &[1.0; DENSE], &[])).unwrap();
        assert!(score(&dense, "a much longer prompt, with words") > score(&dense, "hi"));
    }

    #[test]
    fn rejects_bad_model_files() {
        let good = model_json(8, 0.0, &[0.0; DENSE], &[]);
        assert!(Scorer::from_json(&good).is_ok());
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        let cases: [(&str, serde_json::Value, &str); 6] = [
            (
                "version",
                1.into(),
                "model version 1 but this fastroute reads version 2",
            ),
            ("format", "other".into(), "`format`"),
            ("hash_bits", 9.into(), "expected 2^hash_bits = 512"),
            ("hash_bits", 40.into(), "`hash_bits` is 40"),
            ("features", serde_json::json!(["ln_tokens"]), "trained on features"),
            ("dense", serde_json::json!([0.0]), "`dense` has 1 weights"),
        ];
        for (key, value, want) in cases {
            let old = v[key].clone();
            v[key] = value;
            let err = Scorer::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(err.contains(want), "{key}: {err}");
            v[key] = old;
        }
        assert!(Scorer::from_json(b"{}")
            .unwrap_err()
            .contains("not a classifier model file"));
        assert!(Scorer::from_json(b"[1, 2").is_err());
    }

    #[test]
    fn builtin_scores_are_ordered_and_bounded() {
        let simple = score_builtin(&feats("hi there"), 7);
        let hard_text = "Design a sharded key-value store. Compare the tradeoffs of Raft and Paxos, \
            prove the safety property, and explain step by step why reads must be linearizable. \
            Requirements:\\n- must survive 2 node failures\\n- should keep p99 under 10 ms\\n";
        let hard = score_builtin(&feats(hard_text), 400);
        assert!(simple < 0.2, "{simple}");
        assert!(hard > 0.7, "{hard}");
        assert!((0.0..=1.0).contains(&score_builtin(&Features::default(), u32::MAX)));
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    fn run(name: &str, text: &str, grams: Grams<'_>) {
        run_with(name, text, grams, true);
        run_with(&format!("{name} (byte loop)"), text, grams, false);
    }

    fn run_with(name: &str, text: &str, grams: Grams<'_>, simd: bool) {
        if std::env::var("FR_ONLY").is_ok_and(|v| v != name) {
            return;
        }
        let n: u32 = std::env::var("FR_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20000);
        let t = std::time::Instant::now();
        let mut acc = 0.0;
        for _ in 0..n {
            let mut f = Features::default();
            f.observe_with(std::hint::black_box(text.as_bytes()), grams, simd);
            acc += f.gram_sum + f.words as f32;
        }
        let el = t.elapsed();
        eprintln!(
            "{name}: {} bytes: {:.2} us per observe ({acc})",
            text.len(),
            el.as_secs_f64() / f64::from(n) * 1e6
        );
    }

    #[test]
    #[ignore = "timing, run by hand with --release"]
    fn observe_speed() {
        let text = "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\\nA. 0\\nB. 4\\nC. 2\\nD. 6\\nAnswer:".repeat(20);
        let table = vec![0.01f32; 1 << 16];
        run("weights", &text, Grams::Weights(&table));
        // The 21 KB MMLU text of benches/bench_classify.py, as raw JSON string content.
        let data = std::fs::read_to_string(
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/fastroute/data/routing/mmlu-train.jsonl"),
        )
        .unwrap_or_default();
        let mut mmlu = String::new();
        for line in data.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            mmlu.push_str(v["prompt"].as_str().unwrap_or_default());
            mmlu.push_str("\n\n");
            if mmlu.len() >= 21_000 {
                break;
            }
        }
        let mmlu = serde_json::to_string(&mmlu).unwrap_or_default();
        run("mmlu 21k", &mmlu[1..mmlu.len() - 1], Grams::Weights(&table));
        run("mmlu 2k", &mmlu[1..2180], Grams::Weights(&table));
        run("cyrillic", &"слово, другое слово ".repeat(60), Grams::Weights(&table));
        run("cjk", &"日本語の文章です。 ".repeat(80), Grams::Weights(&table));
        run("off", &text, Grams::Off);
        run("letters", &"abcdefghij".repeat(232), Grams::Off);
        run("spaces", &" ".repeat(2320), Grams::Off);
        run("words", &"abcd ".repeat(464), Grams::Off);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        for _ in 0..20000 {
            x += crate::tokens::Estimator::Fast.count(std::hint::black_box(text.as_bytes())) as u64;
        }
        eprintln!("estimate: {:.2} us ({x})", t.elapsed().as_secs_f64() / 20000.0 * 1e6);
    }
}
