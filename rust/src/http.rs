//! HTTP/1.x message heads and chunked bodies, parsed from bytes the server or the upstream client has
//! already read. No I/O and no allocation: a head borrows the buffer, and the caller hands in the header
//! slots, so one call replaces the per-header callbacks of an event parser.
//!
//! What is decided here is how the message is framed, by the rules a proxy must apply to stay in step
//! with both of its peers (RFC 9112 §6): a request with both `Content-Length` and `Transfer-Encoding`, two
//! differing `Content-Length` values, or a transfer coding that does not end in `chunked` is refused,
//! since a server and a proxy reading such a head differently is how requests are smuggled.

use std::mem::MaybeUninit;

pub use httparse::Header;

/// Why a head or a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Not valid HTTP/1.x, or framed ambiguously.
    Malformed(&'static str),
    /// The head is longer than allowed, or has too many header lines.
    TooLarge,
}

impl HttpError {
    pub fn message(self) -> &'static str {
        match self {
            Self::Malformed(m) => m,
            Self::TooLarge => "the request head is too large",
        }
    }
}

/// How many bytes of `buf` come before the first `stop`, and whether a `stop` was found (else: all of them).
fn run_to(buf: &[u8], stop: u8) -> (usize, bool) {
    memchr::memchr(stop, buf).map_or((buf.len(), false), |k| (k, true))
}

#[cold]
fn malformed(msg: &'static str) -> HttpError {
    HttpError::Malformed(msg)
}

fn from_httparse(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::TooManyHeaders => HttpError::TooLarge,
        httparse::Error::HeaderName => malformed("invalid header name"),
        httparse::Error::HeaderValue => malformed("invalid header value"),
        httparse::Error::NewLine => malformed("invalid line ending"),
        httparse::Error::Status => malformed("invalid status"),
        httparse::Error::Token => malformed("invalid token in the request line"),
        httparse::Error::Version => malformed("invalid HTTP version"),
    }
}

/// How the body after a head is delimited, and what the head says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    /// `Content-Length`, when given (and not overridden by `chunked`).
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// A `Transfer-Encoding` other than one ending in `chunked`: the body runs to the end of the connection.
    pub other_coding: bool,
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` header (or a CONNECT request).
    pub upgrade: bool,
    /// Index into the headers of the first `content-type` and `content-encoding`.
    pub content_type: Option<usize>,
    pub content_encoding: Option<usize>,
}

/// A parsed request head, borrowing the buffer it came from.
#[derive(Debug)]
pub struct RequestHead<'h, 'b> {
    /// The head's length in bytes (its end, counted from the `start` given).
    pub len: usize,
    pub method: &'b str,
    pub target: &'b [u8],
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: &'h [Header<'b>],
    pub framing: Framing,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead<'h, 'b> {
    pub len: usize,
    pub status: u16,
    pub minor: u8,
    pub headers: &'h [Header<'b>],
    pub framing: Framing,
}

/// Header slots for one head; `MAX` is the most header lines accepted.
pub struct Slots<'b, const MAX: usize>([MaybeUninit<Header<'b>>; MAX]);

impl<'b, const MAX: usize> Slots<'b, MAX> {
    pub fn new() -> Self {
        Self([const { MaybeUninit::uninit() }; MAX])
    }

    /// At most `n` of the slots (`n` <= MAX).
    pub fn take(&mut self, n: usize) -> &mut [MaybeUninit<Header<'b>>] {
        let n = n.min(MAX);
        &mut self.0[..n]
    }
}

impl<const MAX: usize> Default for Slots<'_, MAX> {
    fn default() -> Self {
        Self::new()
    }
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn parse_length(value: &[u8]) -> Result<u64, HttpError> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(malformed("invalid Content-Length"));
    }
    Ok(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Scan the headers once for framing and connection handling. `minor` is the HTTP/1.x minor version.
fn framing(headers: &[Header<'_>], minor: u8) -> Result<Framing, HttpError> {
    let mut f = Framing::default();
    let (mut te_seen, mut close, mut keep, mut conn_upgrade, mut upgrade_header) = (false, false, false, false, false);
    for (i, h) in headers.iter().enumerate() {
        let name = h.name.as_bytes();
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let n = parse_length(h.value)?;
                if f.content_length.is_some_and(|m| m != n) {
                    return Err(malformed("differing Content-Length values"));
                }
                f.content_length = Some(n);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                te_seen = true;
                // the last coding of the last header decides; a later header appends to earlier ones
                if let Some(last) = tokens(h.value).last() {
                    f.chunked = last.eq_ignore_ascii_case(b"chunked");
                }
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        conn_upgrade = true;
                    }
                }
            }
            7 if name.eq_ignore_ascii_case(b"upgrade") => upgrade_header = true,
            12 if f.content_type.is_none() && name.eq_ignore_ascii_case(b"content-type") => f.content_type = Some(i),
            16 if f.content_encoding.is_none() && name.eq_ignore_ascii_case(b"content-encoding") => {
                f.content_encoding = Some(i)
            }
            _ => {}
        }
    }
    if te_seen {
        if f.content_length.is_some() {
            return Err(malformed("both Content-Length and Transfer-Encoding"));
        }
        f.other_coding = !f.chunked;
    }
    f.keep_alive = !close && (minor >= 1 || keep);
    f.upgrade = conn_upgrade && upgrade_header;
    Ok(f)
}

/// Parse the request head at `buf[start..]`. `Ok(None)`: incomplete, read more. The head may be at most
/// `max_len` bytes; `slots` bounds the number of header lines.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    start: usize,
    max_len: usize,
    slots: &'h mut [MaybeUninit<Header<'b>>],
) -> Result<Option<RequestHead<'h, 'b>>, HttpError> {
    let data = buf.get(start..).unwrap_or_default();
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(data, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if data.len() > max_len {
                Err(HttpError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(from_httparse(e)),
    };
    if len > max_len {
        return Err(HttpError::TooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(malformed("incomplete request line"));
    };
    let headers: &'h [Header<'b>] = req.headers;
    let mut framing = framing(headers, minor)?;
    if framing.other_coding {
        return Err(malformed("a request's Transfer-Encoding must end in chunked"));
    }
    framing.upgrade |= method == "CONNECT";
    Ok(Some(RequestHead {
        len,
        method,
        target: target.as_bytes(),
        minor,
        headers,
        framing,
    }))
}

/// Parse the response head at `buf[start..]`, as `parse_request`.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    start: usize,
    max_len: usize,
    slots: &'h mut [MaybeUninit<Header<'b>>],
) -> Result<Option<ResponseHead<'h, 'b>>, HttpError> {
    let data = buf.get(start..).unwrap_or_default();
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, data, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if data.len() > max_len {
                Err(HttpError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(e) => return Err(from_httparse(e)),
    };
    if len > max_len {
        return Err(HttpError::TooLarge);
    }
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(malformed("incomplete status line"));
    };
    let headers: &'h [Header<'b>] = resp.headers;
    let mut framing = framing(headers, minor)?;
    if framing.other_coding {
        framing.keep_alive = false; // delimited by the end of the connection
    }
    Ok(Some(ResponseHead {
        len,
        status,
        minor,
        headers,
        framing,
    }))
}

// ---------------------------------------------------------------------------------------------------
// Chunked bodies
// ---------------------------------------------------------------------------------------------------

/// The longest chunk-size line (size and extensions) and the most trailer bytes accepted.
const MAX_SIZE_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    EndLf,
    Done,
}

/// A chunked body decoder, fed the bytes as they arrive.
#[derive(Debug, Default)]
pub struct ChunkDecoder {
    state: State,
    size: u64,
    digits: usize,
    line: usize,
    trailers: usize,
}

impl ChunkDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode from `buf[start..]`, calling `data` with each piece of body (a range of `buf`). Returns where
    /// decoding stopped: the end of the buffer, or just past the body's last byte once it is done (the
    /// bytes after it belong to the next message).
    pub fn feed(&mut self, buf: &[u8], start: usize, mut data: impl FnMut(usize, usize)) -> Result<usize, HttpError> {
        let mut i = start;
        let n = buf.len();
        while i < n {
            let b = buf[i];
            match self.state {
                State::Size => {
                    let d = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        b'A'..=b'F' => b - b'A' + 10,
                        _ => {
                            if self.digits == 0 {
                                return Err(malformed("invalid chunk size"));
                            }
                            self.state = match b {
                                b'\r' => State::SizeLf,
                                b';' | b' ' | b'\t' => State::Ext,
                                _ => return Err(malformed("invalid chunk size")),
                            };
                            i += 1;
                            continue;
                        }
                    };
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err(malformed("chunk size too large"));
                    }
                    self.size = self.size * 16 + u64::from(d);
                    i += 1;
                }
                State::Ext => {
                    // chunk extensions are ignored, up to the end of the line
                    let (k, found) = run_to(&buf[i..], b'\r');
                    self.line += k;
                    i += k + usize::from(found);
                    if found {
                        self.state = State::SizeLf;
                    }
                    if self.line > MAX_SIZE_LINE {
                        return Err(malformed("chunk extension too long"));
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(malformed("invalid chunk size line"));
                    }
                    i += 1;
                    self.digits = 0;
                    self.line = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let take = usize::try_from(self.size).unwrap_or(usize::MAX).min(n - i);
                    data(i, i + take);
                    i += take;
                    self.size -= take as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(malformed("chunk data not followed by CRLF"));
                    }
                    i += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(malformed("chunk data not followed by CRLF"));
                    }
                    i += 1;
                    self.state = State::Size;
                }
                State::TrailerStart => {
                    i += 1;
                    self.state = if b == b'\r' { State::EndLf } else { State::TrailerLine };
                    self.trailers += 1;
                }
                State::TrailerLine => {
                    let (k, found) = run_to(&buf[i..], b'\n');
                    self.trailers += k + usize::from(found);
                    i += k + usize::from(found);
                    if found {
                        self.state = State::TrailerStart;
                    }
                    if self.trailers > MAX_TRAILERS {
                        return Err(malformed("chunked trailers too long"));
                    }
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(malformed("invalid end of a chunked body"));
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = (usize, Framing, Vec<(String, Vec<u8>)>);

    fn req(buf: &[u8]) -> Result<Option<Parsed>, HttpError> {
        let mut slots = Slots::<64>::new();
        parse_request(buf, 0, 1024, slots.take(64)).map(|h| {
            h.map(|h| {
                (
                    h.len,
                    h.framing,
                    h.headers
                        .iter()
                        .map(|x| (x.name.to_owned(), x.value.to_vec()))
                        .collect(),
                )
            })
        })
    }

    #[test]
    fn request_framing() {
        let (len, f, hs) = req(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(len, 52);
        assert_eq!(f.content_length, Some(3));
        assert!(f.keep_alive && !f.chunked);
        assert_eq!(hs.len(), 2);
        let (_, f, _) = req(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(f.keep_alive);
        let (_, f, _) = req(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!f.keep_alive);
        let (_, f, _) = req(b"GET / HTTP/1.1\r\nconnection: x, close\r\n\r\n").unwrap().unwrap();
        assert!(!f.keep_alive);
        let (_, f, _) = req(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(f.chunked);
        let (_, f, _) = req(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(f.upgrade);
        let (_, f, _) = req(b"POST / HTTP/1.1\r\ncontent-length: 4\r\nContent-Length: 4\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(f.content_length, Some(4));
    }

    #[test]
    fn request_refusals() {
        for bad in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /\r\n\r\n",
            b"G@T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(
                matches!(req(bad), Err(HttpError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(req(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let big = [b"GET /".as_slice(), &[b'a'; 2000]].concat();
        assert_eq!(req(&big), Err(HttpError::TooLarge));
        let many: Vec<u8> = (0..65).flat_map(|i| format!("h{i}: v\r\n").into_bytes()).collect();
        let buf = [b"GET / HTTP/1.1\r\n".as_slice(), &many, b"\r\n"].concat();
        assert_eq!(req(&buf), Err(HttpError::TooLarge));
    }

    #[test]
    fn response_framing() {
        let mut slots = Slots::<16>::new();
        let buf = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: br\r\n\r\n";
        let h = parse_response(buf, 0, 1024, slots.take(16)).unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert!(h.framing.other_coding && !h.framing.keep_alive);
        assert_eq!(h.framing.content_type, Some(0));
    }

    fn dechunk(parts: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), HttpError> {
        let mut d = ChunkDecoder::new();
        let mut out = Vec::new();
        let mut end = 0;
        for p in parts {
            end = d.feed(p, 0, |a, b| out.extend_from_slice(&p[a..b]))?;
        }
        Ok((out, d.done(), end))
    }

    #[test]
    fn chunks_in_any_split() {
        let body = b"5;x=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nT: v\r\n\r\nNEXT";
        for cut in 0..body.len() {
            let (a, b) = body.split_at(cut);
            let (out, done, end) = dechunk(&[a, b]).unwrap();
            assert_eq!(out, b"hello0123456789");
            assert!(done);
            if cut < body.len() - 4 {
                assert_eq!(&b[end..], b"NEXT");
            }
        }
    }

    #[test]
    fn bad_chunks() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"1234567890abcdef0\r\n",
            b"5\nhello",
        ] {
            assert!(dechunk(&[bad]).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest::proptest! {
        /// Any body, cut into any chunks, chunk-encoded and fed in any pieces, decodes to itself and stops
        /// exactly at its end.
        #[test]
        fn chunked_round_trip(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            sizes in proptest::collection::vec(1usize..80, 1..20),
            cut in 0usize..2000,
        ) {
            let mut enc = Vec::new();
            let mut rest = body.as_slice();
            let mut i = 0;
            while !rest.is_empty() {
                let n = sizes[i % sizes.len()].min(rest.len());
                enc.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                enc.extend_from_slice(&rest[..n]);
                enc.extend_from_slice(b"\r\n");
                rest = &rest[n..];
                i += 1;
            }
            enc.extend_from_slice(b"0\r\n\r\n");
            let whole = enc.len();
            enc.extend_from_slice(b"GET");
            let cut = cut % (whole + 1);
            let mut d = ChunkDecoder::new();
            let mut out = Vec::new();
            let first = &enc[..cut];
            let end1 = d.feed(first, 0, |a, b| out.extend_from_slice(&first[a..b])).unwrap();
            proptest::prop_assert_eq!(end1, cut);
            let end = d.feed(&enc, cut, |a, b| out.extend_from_slice(&enc[a..b])).unwrap();
            proptest::prop_assert!(d.done());
            proptest::prop_assert_eq!(end, whole);
            proptest::prop_assert_eq!(out, body);
        }

        /// Arbitrary bytes never panic the parsers: a head, "need more", or an error.
        #[test]
        fn any_bytes_are_parsed_or_refused(raw in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut slots = Slots::<16>::new();
            let _ = parse_request(&raw, 0, 256, slots.take(16));
            let mut slots = Slots::<16>::new();
            let _ = parse_response(&raw, 0, 256, slots.take(16));
            let _ = ChunkDecoder::new().feed(&raw, 0, |_, _| {});
        }
    }
}
