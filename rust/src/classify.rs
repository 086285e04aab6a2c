//! The complexity heuristic behind `classify: complexity` routes: features counted over the prompt
//! text during the body scan (`Features::observe`), and a fixed logistic scorer (`score`) that maps
//! them to [0, 1]. The two halves are separate so a trained scorer can replace the weights without
//! touching feature extraction. This module must never look at anything but prompt text and the
//! token estimate, and never allocate.

/// Counts gathered over every text string of one request. Cheap, additive, `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `?` characters.
    pub questions: u32,
    /// Code fences (three backticks).
    pub code_fences: u32,
    /// Math symbols: `=`, `^`, `+`, and the Unicode mathematical operators block.
    pub math: u32,
    /// Words asking for reasoning (explain, analyze, compare, prove, design, why, "step by step", …).
    pub reasoning: u32,
    /// Words stating constraints (must, should, ensure, without, exactly, …).
    pub constraints: u32,
    /// Lines that start a list item (`- `, `* `, `1.`, `2)`).
    pub list_items: u32,
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

impl Features {
    /// Add the features of one text string (raw JSON string content: `\n` is still the two
    /// bytes backslash, `n`). Linear in `text`, a handful of branches per byte.
    pub fn observe(&mut self, text: &[u8]) {
        let mut word = [0u8; MAX_WORD];
        let mut wlen = 0usize;
        let mut prev_words = [0u8; 2]; // 1 = "step", 2 = "by"
        let mut ticks = 0u32;
        let mut line_start = true;
        let mut i = 0;
        while i < text.len() {
            let b = text[i];
            if b.is_ascii_alphabetic() {
                if wlen < MAX_WORD {
                    word[wlen] = b.to_ascii_lowercase();
                }
                wlen += 1;
                i += 1;
                continue;
            }
            if wlen > 0 {
                self.word(&word[..wlen.min(MAX_WORD)], wlen, &mut prev_words);
                wlen = 0;
            }
            if b == b'`' {
                ticks += 1;
                if ticks == 3 {
                    self.code_fences += 1;
                    ticks = 0;
                }
            } else {
                ticks = 0;
            }
            match b {
                b'?' => self.questions += 1,
                b'=' | b'^' | b'+' => self.math += 1,
                0xE2 if matches!(text.get(i + 1), Some(0x88..=0x8B)) => self.math += 1,
                _ => {}
            }
            let newline = b == b'\n' || (b == b'\\' && text.get(i + 1) == Some(&b'n'));
            if newline {
                line_start = true;
                i += if b == b'\\' { 2 } else { 1 };
                continue;
            }
            if line_start && b != b' ' && b != b'\t' {
                line_start = false;
                if is_list_marker(&text[i..]) {
                    self.list_items += 1;
                }
            }
            i += 1;
        }
        if wlen > 0 {
            self.word(&word[..wlen.min(MAX_WORD)], wlen, &mut prev_words);
        }
    }

    #[inline]
    fn word(&mut self, w: &[u8], len: usize, prev: &mut [u8; 2]) {
        if len > MAX_WORD {
            *prev = [0, 0];
            return;
        }
        if w == b"step" && *prev == [1, 2] {
            self.reasoning += 1;
        }
        let tag = match w {
            b"step" => 1,
            b"by" => 2,
            _ => 0,
        };
        *prev = [prev[1], tag];
        if REASONING.contains(&w) {
            self.reasoning += 1;
        } else if CONSTRAINTS.contains(&w) {
            self.constraints += 1;
        }
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

/// The fixed weights of the logistic scorer, `z = BIAS + Σ weight · feature`:
/// - `TOKENS` per unit of `ln(1 + tokens)`: length is the strongest single signal;
/// - `QUESTIONS` per `?`, at most 4 counted;
/// - `CODE` per code block (two fences), at most 3;
/// - `MATH` per math symbol, at most 20;
/// - `REASONING` per reasoning word, at most 6;
/// - `CONSTRAINTS` per constraint word or list item, at most 12.
///
/// Picked by hand so that greetings and one-line lookups score below 0.2 and multi-part
/// design, proof or code-review prompts above 0.7; a later issue trains them.
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

/// Complexity in [0, 1] from the features and the token estimate. A few float ops.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "small counts, capped")]
pub fn score(f: &Features, tokens: u32) -> f32 {
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
        f.observe(s.as_bytes());
        f
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
    }

    #[test]
    fn scores_are_ordered_and_bounded() {
        let simple = score(&feats("hi there"), 7);
        let hard_text = "Design a sharded key-value store. Compare the tradeoffs of Raft and Paxos, \
            prove the safety property, and explain step by step why reads must be linearizable. \
            Requirements:\\n- must survive 2 node failures\\n- should keep p99 under 10 ms\\n";
        let hard = score(&feats(hard_text), 400);
        assert!(simple < 0.2, "{simple}");
        assert!(hard > 0.7, "{hard}");
        assert!((0.0..=1.0).contains(&score(&Features::default(), u32::MAX)));
    }
}
