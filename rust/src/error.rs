//! The two error types of the decision core: `CompileError` (a spec that cannot be compiled,
//! with the config path of the mistake) and `DecideError` (a request the router cannot read,
//! with the request field at fault). Constructors are `#[cold]`: errors never sit on the fast
//! path. This module must never format anything on a successful request.

use std::borrow::Cow;
use std::fmt;

/// A spec that cannot be compiled. `path` names the config key (`routes[3].match.headers.x-tier.regex`),
/// empty when the spec is not even valid JSON of the right shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    /// Where in the config: dotted keys and `[index]`es, as the operator wrote them.
    pub path: String,
    /// What is wrong, in one sentence.
    pub msg: String,
}

impl CompileError {
    /// An error at `path`. Runs only while compiling.
    #[cold]
    #[must_use]
    pub fn new(path: impl Into<String>, msg: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.msg)
        } else {
            write!(f, "{}: {}", self.path, self.msg)
        }
    }
}

impl std::error::Error for CompileError {}

/// A request the router cannot read: malformed JSON, a body that is not an object, or a known
/// field of the wrong type. The gateway answers 400 with `msg`; `param` names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecideError {
    /// What is wrong, for the client.
    pub msg: Cow<'static, str>,
    /// The request field at fault (`stream`, `messages`, …), when there is one.
    pub param: Option<&'static str>,
}

impl DecideError {
    /// A field of the wrong type, or otherwise unusable. Cold: built only on the error path.
    #[cold]
    #[must_use]
    pub fn field(param: &'static str, msg: &'static str) -> Self {
        Self {
            msg: Cow::Borrowed(msg),
            param: Some(param),
        }
    }

    /// Malformed JSON at byte offset `at`.
    #[cold]
    #[must_use]
    pub fn syntax(what: &'static str, at: usize) -> Self {
        Self {
            msg: Cow::Owned(format!("malformed JSON body: {what} at byte {at}")),
            param: None,
        }
    }

    /// Any other unreadable request.
    #[cold]
    #[must_use]
    pub fn other(msg: &'static str) -> Self {
        Self {
            msg: Cow::Borrowed(msg),
            param: None,
        }
    }
}

impl fmt::Display for DecideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for DecideError {}
