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

/// The murmur3 finalizer: spreads a word hash over all 32 bits.
#[inline]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// The bucket hash of a unigram, from its FNV-1a word hash.
#[inline]
const fn unigram(h: u32) -> u32 {
    fmix(h)
}

/// The bucket hash of a bigram, from the two word hashes.
#[inline]
const fn bigram(prev: u32, h: u32) -> u32 {
    fmix(prev.wrapping_mul(0x9e37_79b1) ^ h ^ 0x5bd1_e995)
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

const MAX_WORD: usize = 12;

/// FNV-1a of a lowercase ASCII word: the running hash `observe` keeps per word.
const fn fnv(w: &[u8]) -> u32 {
    let mut h = FNV_OFFSET;
    let mut i = 0;
    while i < w.len() {
        h = (h ^ w[i] as u32).wrapping_mul(FNV_PRIME);
        i += 1;
    }
    h
}

const fn hashes<const N: usize>(words: &[&[u8]]) -> [u32; N] {
    let mut out = [0u32; N];
    let mut i = 0;
    while i < N {
        out[i] = fnv(words[i]);
        i += 1;
    }
    out
}

// NOTE: cue words are found by comparing the word's running hash with these (one SIMD-friendly scan of a few
// u32s per word) and only then the bytes; comparing each word with every cue as slices cost ~1 µs per 2 KB.
const REASONING_HASHES: [u32; REASONING.len()] = hashes(REASONING);
const CONSTRAINT_HASHES: [u32; CONSTRAINTS.len()] = hashes(CONSTRAINTS);
/// A bit per cue word hash (64 words of 64 bits, by hash bits 26..32 and 20..26): most words are ruled out by
/// one lookup.
const CUE_BLOOM: [u64; 64] = {
    let mut out = [0u64; 64];
    let mut i = 0;
    while i < REASONING.len() + CONSTRAINTS.len() {
        let h = if i < REASONING.len() {
            REASONING_HASHES[i]
        } else {
            CONSTRAINT_HASHES[i - REASONING.len()]
        };
        out[(h >> 26) as usize] |= 1 << ((h >> 20) & 63);
        i += 1;
    }
    out
};
const STEP: u32 = fnv(b"step");
const BY: u32 = fnv(b"by");

/// Lowercase of each ASCII letter and digit; 0 for every other byte.
const LOWER_ALNUM: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] = c.to_ascii_lowercase();
        }
        b += 1;
    }
    t
};

/// ASCII punctuation that only ends a word: no feature counts it and no list item starts with it.
const PLAIN_SEP: [bool; 256] = {
    let mut t = [false; 256];
    let seps = b" ,.;:!()[]{}<>'\"%&@#|~_";
    let mut i = 0;
    while i < seps.len() {
        t[seps[i] as usize] = true;
        i += 1;
    }
    t
};

/// No word is being read from raw ASCII (`Observer::word_start`).
const IMPURE: usize = usize::MAX;

/// The state of one `observe` call: the word being read and what came before it.
struct Observer<'f, 'm> {
    f: &'f mut Features,
    /// The weight table (`Grams::Weights`), else empty; `mask` = its length - 1.
    table: &'m [f32],
    mask: usize,
    /// `Grams::Collect`'s buffer and mask.
    collect: Option<(&'m RefCell<Vec<u32>>, u32)>,
    /// N-gram hits and the sum of their weights, written to `f` at the end.
    hits: u32,
    sum: f32,
    /// Where the current word starts in the text, when all of it is raw ASCII letters and digits (so it can be
    /// compared with the cue words in place); `IMPURE` otherwise.
    word_start: usize,
    wlen: usize,
    hash: u32,
    prev_hash: Option<u32>,
    prev_words: [u8; 2], // 1 = "step", 2 = "by"
    ticks: u32,
    line_start: bool,
    last: u8,
}

impl Observer<'_, '_> {
    /// One unescaped byte that is not a raw ASCII letter or digit (those take the fast path in `observe`), or
    /// any byte decoded from an escape. `rest` is the raw text from this byte on (for list markers), empty when
    /// the byte came from an escape.
    #[inline]
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
            let c = c.to_ascii_lowercase();
            if self.wlen == 0 && c.is_ascii_digit() {
                self.f.numbers += 1;
            }
            self.word_start = IMPURE;
            self.wlen += 1;
            self.hash = (self.hash ^ u32::from(c)).wrapping_mul(FNV_PRIME);
            self.ticks = 0;
            self.last = c;
            return;
        }
        self.end_word(&[]);
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
        self.hits += 1;
        if let Some(w) = self.table.get(h as usize & self.mask) {
            self.sum += *w;
        } else if let Some((out, mask)) = self.collect {
            if let Ok(mut v) = out.try_borrow_mut() {
                v.push(h & mask);
            }
        }
    }

    /// The word read so far ends: its n-grams, and whether it is a cue word. `text` is the whole raw text.
    #[inline(always)]
    fn end_word(&mut self, text: &[u8]) {
        if self.wlen != 0 {
            self.word_ends(text);
        }
    }

    #[inline(always)]
    fn word_ends(&mut self, text: &[u8]) {
        let h = self.hash;
        self.f.words += 1;
        self.hit(unigram(h));
        if let Some(p) = self.prev_hash {
            self.hit(bigram(p, h));
        }
        self.prev_hash = Some(h);
        let (len, start) = (self.wlen, self.word_start);
        self.wlen = 0;
        self.hash = FNV_OFFSET;
        let w = match text.get(start..start.saturating_add(len)) {
            Some(w) if len <= MAX_WORD => w,
            _ => {
                self.prev_words = [0, 0];
                return;
            }
        };
        let tag = if h == STEP && w.eq_ignore_ascii_case(b"step") {
            if self.prev_words == [1, 2] {
                self.f.reasoning += 1;
            }
            1
        } else if h == BY && w.eq_ignore_ascii_case(b"by") {
            2
        } else {
            0
        };
        self.prev_words = [self.prev_words[1], tag];
        if CUE_BLOOM[(h >> 26) as usize] & (1 << ((h >> 20) & 63)) == 0 {
            return;
        }
        if let Some(i) = REASONING_HASHES.iter().position(|&c| c == h) {
            if REASONING[i].eq_ignore_ascii_case(w) {
                self.f.reasoning += 1;
            }
        } else if let Some(i) = CONSTRAINT_HASHES.iter().position(|&c| c == h) {
            if CONSTRAINTS[i].eq_ignore_ascii_case(w) {
                self.f.constraints += 1;
            }
        }
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
    /// Add the features of one text string (raw JSON string content: escapes are decoded here, so
    /// `\n`, `\u00e9` and a literal `é` count alike). Linear in `text`: runs of ASCII letters and digits
    /// take a tight loop (a table lookup and a multiply per byte); each word ends in one or two `grams`
    /// hits. Words are cue words only when written in plain ASCII (no escapes inside).
    pub fn observe(&mut self, text: &[u8], grams: Grams<'_>) {
        self.bytes = self.bytes.saturating_add(u32::try_from(text.len()).unwrap_or(u32::MAX));
        let (table, collect): (&[f32], _) = match grams {
            Grams::Off => (&[], None),
            Grams::Weights(t) => (t, None),
            Grams::Collect(out, mask) => (&[], Some((out, mask))),
        };
        let mut o = Observer {
            f: self,
            table,
            mask: table.len().wrapping_sub(1),
            collect,
            hits: 0,
            sum: 0.0,
            word_start: IMPURE,
            wlen: 0,
            hash: FNV_OFFSET,
            prev_hash: None,
            prev_words: [0, 0],
            ticks: 0,
            line_start: true,
            last: 0,
        };
        let n = text.len();
        let mut i = 0;
        while i < n {
            let b = text[i];
            let mut c = LOWER_ALNUM[usize::from(b)];
            if c != 0 {
                if o.line_start {
                    o.line_start = false;
                    if is_list_marker(&text[i..]) {
                        o.f.list_items += 1;
                    }
                }
                if o.wlen == 0 {
                    o.word_start = i;
                    if c.is_ascii_digit() {
                        o.f.numbers += 1;
                    }
                }
                let mut h = o.hash;
                let start = i;
                loop {
                    h = (h ^ u32::from(c)).wrapping_mul(FNV_PRIME);
                    i += 1;
                    match text.get(i) {
                        Some(&next) => c = LOWER_ALNUM[usize::from(next)],
                        None => break,
                    }
                    if c == 0 {
                        break;
                    }
                }
                o.hash = h;
                o.wlen += i - start;
                o.ticks = 0;
                o.last = text[i - 1];
                continue;
            }
            if PLAIN_SEP[usize::from(b)] && (b != b' ' || !o.line_start) {
                o.end_word(text);
                o.line_start = false;
                o.ticks = 0;
                o.last = b;
                i += 1;
                continue;
            }
            if b != b'\\' {
                if o.wlen > 0 && b < 0x80 {
                    o.end_word(text);
                }
                o.unit(b, &text[i..]);
                i += 1;
                continue;
            }
            match text.get(i + 1).copied() {
                Some(b'u') => match hex4(&text[(i + 2).min(n)..]) {
                    Some(cp) => {
                        if cp < 0x80 && !u8::try_from(cp).is_ok_and(|a| a.is_ascii_alphanumeric()) {
                            o.end_word(text);
                        }
                        let mut utf8 = [0u8; 4];
                        let s: &[u8] = match char::from_u32(cp) {
                            Some(ch) => ch.encode_utf8(&mut utf8).as_bytes(),
                            None => b"\xef\xbf\xbd", // a lone surrogate: U+FFFD
                        };
                        for &c in s {
                            o.unit(c, &[]);
                        }
                        i += 6;
                    }
                    None => {
                        o.end_word(text);
                        o.unit(b' ', &[]);
                        i += 2;
                    }
                },
                Some(b'n') => {
                    o.end_word(text);
                    o.unit(b'\n', &[]);
                    i += 2;
                }
                Some(c @ (b'"' | b'\\' | b'/')) => {
                    o.end_word(text);
                    o.unit(c, &[]);
                    i += 2;
                }
                _ => {
                    o.end_word(text);
                    o.unit(b' ', &[]);
                    i += 2;
                }
            }
        }
        o.end_word(text);
        let (hits, sum) = (o.hits, o.sum);
        self.gram_hits += hits;
        self.gram_sum += sum;
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
pub const MODEL_VERSION: u32 = 1;
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

    #[test]
    fn a_word_inside_a_line_is_no_list_marker() {
        assert_eq!(feats("Hello - world\\n- item").list_items, 1);
    }

    #[test]
    fn escapes_and_literal_text_hash_alike() {
        let literal = "Café naïve − résumé \"quoted\" ∑ 日本";
        let escaped = "Caf\\u00e9 na\\u00efve \\u2212 r\\u00e9sum\\u00e9 \\\"quoted\\\" \\u2211 \\u65e5\\u672c";
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
            ("version", 2.into(), "version 2"),
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
        if std::env::var("FR_ONLY").is_ok_and(|v| v != name) {
            return;
        }
        let n: u32 = std::env::var("FR_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20000);
        let t = std::time::Instant::now();
        let mut acc = 0.0;
        for _ in 0..n {
            let mut f = Features::default();
            f.observe(std::hint::black_box(text.as_bytes()), grams);
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
