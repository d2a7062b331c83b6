//! Chunked transfer coding (RFC 9112 §7.1): a strict decoder for upstream response bodies and
//! the encoder for what the app receives.
//!
//! The fast path never relays an upstream's chunked framing: it decodes the body as it arrives
//! and writes chunks of its own, so an app is only ever handed framing keyproxy wrote. A body an
//! HTTP parser could read two ways (a bare LF after chunk data, LF-only lines, control bytes in
//! an extension, a size that overflows) is refused outright, not guessed at. Extensions are
//! dropped; trailer fields are read and dropped (not forwarded), within a bound.

/// Most bytes in one chunk-size line's extensions (hyper allows 16 KiB for all of a body's;
/// Pingora bounds a partial chunk head at 1 KiB).
const MAX_EXT: usize = 4 * 1024;
/// Most bytes of trailer fields after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;
/// Room left in front of a chunk's data for its size line: 16 hex digits and CRLF.
pub(super) const SIZE_ROOM: usize = 18;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum ChunkError {
    /// Not a hex digit where the size is, or none at all.
    #[error("an invalid chunk size")]
    Size,
    /// More than 16 hex digits.
    #[error("a chunk size that overflows")]
    Overflow,
    /// A line not ended by CRLF, or chunk data not followed by CRLF.
    #[error("a chunk line not ended by CRLF")]
    LineEnd,
    /// A control byte in a chunk extension or trailer field.
    #[error("a control character in a chunk extension or trailer")]
    Control,
    /// Extensions or trailers beyond the bounds.
    #[error("chunk extensions or trailers that are too long")]
    TooLong,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size.
    #[default]
    Size,
    /// After the size: extensions, up to CR.
    Ext,
    /// The LF ending the size line.
    SizeLf,
    /// In the chunk's data (`size` bytes left).
    Data,
    /// The CR after the data.
    DataCr,
    /// The LF after the data.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The LF of the final empty line.
    EndLf,
}

/// Decodes a chunked body as its bytes pass by, in pieces split anywhere.
#[derive(Debug, Default)]
pub(super) struct Decoder {
    state: State,
    size: u64,
    digits: u8,
    /// Bytes of extension on this size line, or of trailers so far.
    extra: usize,
}

/// A byte allowed in an extension or a trailer field line: visible ASCII, SP, HTAB, obs-text.
fn field_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

impl Decoder {
    /// Decodes `input` (the next bytes of the body), appending the data to `out`.
    /// `Ok(Some(n))`: the body ended after `n` bytes of `input` (the rest is not body).
    pub(super) fn decode(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 16 {
                            return Err(ChunkError::Overflow);
                        }
                        let d = (b as char).to_digit(16).ok_or(ChunkError::Size)?;
                        self.digits += 1;
                        self.size = (self.size << 4) | u64::from(d);
                    }
                    _ if self.digits == 0 => return Err(ChunkError::Size),
                    b';' | b' ' | b'\t' => {
                        self.state = State::Ext;
                        self.extra = 1;
                    }
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => return Err(ChunkError::Size),
                },
                State::Ext => match b {
                    b'\r' => self.state = State::SizeLf,
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ if !field_byte(b) => return Err(ChunkError::Control),
                    _ => {
                        self.extra += 1;
                        if self.extra > MAX_EXT {
                            return Err(ChunkError::TooLong);
                        }
                    }
                },
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.digits = 0;
                    self.extra = 0;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let take =
                        (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[i..i + take]);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.state = State::Size;
                }
                State::TrailerStart | State::Trailer => {
                    match b {
                        b'\r' if self.state == State::TrailerStart => self.state = State::EndLf,
                        b'\r' => self.state = State::TrailerLf,
                        b'\n' => return Err(ChunkError::LineEnd),
                        _ if !field_byte(b) => return Err(ChunkError::Control),
                        // A trailer line may not start with whitespace (no obs-fold).
                        b' ' | b'\t' if self.state == State::TrailerStart => {
                            return Err(ChunkError::Control)
                        }
                        _ => self.state = State::Trailer,
                    }
                    self.extra += 1;
                    if self.extra > MAX_TRAILERS {
                        return Err(ChunkError::TooLong);
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    *self = Decoder::default();
                    return Ok(Some(i + 1));
                }
            }
            i += 1;
        }
        Ok(None)
    }
}

/// Starts a chunk at the end of `out`: leaves room for its size line. Data is then appended,
/// and [`end_chunk`] frames it.
pub(super) fn begin_chunk(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.resize(at + SIZE_ROOM, 0);
    at
}

/// Frames the data appended since [`begin_chunk`] returned `at` as one chunk (size line before,
/// CRLF after); no data, no chunk. With `last`, the last chunk (`0` CRLF CRLF) follows.
pub(super) fn end_chunk(out: &mut Vec<u8>, at: usize, last: bool) {
    let data = out.len() - at - SIZE_ROOM;
    if data == 0 {
        out.truncate(at);
    } else {
        let mut line = [0u8; SIZE_ROOM];
        let digits = format_hex(&mut line, data as u64);
        line[digits] = b'\r';
        line[digits + 1] = b'\n';
        let n = digits + 2;
        out[at + SIZE_ROOM - n..at + SIZE_ROOM].copy_from_slice(&line[..n]);
        out.drain(at..at + SIZE_ROOM - n);
        out.extend_from_slice(b"\r\n");
    }
    if last {
        out.extend_from_slice(b"0\r\n\r\n");
    }
}

/// Writes `n` in lower-case hex at the start of `buf`; returns the digit count.
fn format_hex(buf: &mut [u8; SIZE_ROOM], n: u64) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (64 - n.leading_zeros() as usize).div_ceil(4);
    let digits = digits.max(1);
    for (i, slot) in buf[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *slot = HEX[((n >> shift) & 0xf) as usize];
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `body` fed in pieces of `piece` bytes: the data and where the body ended.
    fn decode_in_pieces(body: &[u8], piece: usize) -> Result<(Vec<u8>, Option<usize>), ChunkError> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut offset = 0;
        for part in body.chunks(piece) {
            if let Some(end) = d.decode(part, &mut out)? {
                return Ok((out, Some(offset + end)));
            }
            offset += part.len();
        }
        Ok((out, None))
    }

    #[test]
    fn canonical_bodies_decode_whatever_the_split() {
        let body = b"5\r\nhello\r\n1a;ext=1;q=\"a b\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for piece in 1..body.len() {
            let (data, at) = decode_in_pieces(body, piece).expect("valid");
            assert_eq!(at, Some(end), "piece {piece}");
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
        }
        assert_eq!(
            decode_in_pieces(b"0\r\n\r\n", 100),
            Ok((Vec::new(), Some(5)))
        );
        assert_eq!(
            decode_in_pieces(b"3\r\nabc\r\n", 100),
            Ok((b"abc".to_vec(), None))
        );
        assert_eq!(
            decode_in_pieces(b"000A\r\n0123456789\r\n0\r\n\r\n", 3).map(|r| r.1),
            Ok(Some(23))
        );
    }

    #[test]
    fn ambiguous_or_malformed_bodies_are_refused() {
        let cases: [(&[u8], ChunkError); 14] = [
            // The smuggling shape: a bare LF after the data, then a "chunk" hiding a response.
            (b"5\r\nhello\n1000\r\n\r\n", ChunkError::LineEnd),
            (b"5\nhello\r\n", ChunkError::LineEnd),
            (b"5\r\nhelloXX", ChunkError::LineEnd),
            (b"5\r\nhello\rX", ChunkError::LineEnd),
            (b"5;a\nhello", ChunkError::LineEnd),
            (b"5;a\x01b\r\nhello\r\n", ChunkError::Control),
            (b"5;a\x7f\r\n", ChunkError::Control),
            (b"x\r\n", ChunkError::Size),
            (b"\r\n", ChunkError::Size),
            (b"-5\r\n", ChunkError::Size),
            (b"0x5\r\n", ChunkError::Size),
            (b"10000000000000000\r\n", ChunkError::Overflow),
            (b"0\r\n \r\n\r\n", ChunkError::Control),
            (b"0\r\nx: 1\n\r\n", ChunkError::LineEnd),
        ];
        for (bad, why) in cases {
            assert_eq!(
                decode_in_pieces(bad, 100).map(|_| ()),
                Err(why),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_ext = [b"1;".as_slice(), &[b'a'; MAX_EXT], b"\r\n"].concat();
        assert_eq!(
            decode_in_pieces(&long_ext, 100).map(|_| ()),
            Err(ChunkError::TooLong)
        );
    }

    #[test]
    fn chunks_are_framed_canonically() {
        let mut out = b"HEAD".to_vec();
        let at = begin_chunk(&mut out);
        out.extend_from_slice(&[b'x'; 300]);
        end_chunk(&mut out, at, false);
        assert_eq!(&out[..9], b"HEAD12c\r\n");
        assert!(out.ends_with(b"xx\r\n"));
        assert_eq!(out.len(), 4 + 5 + 300 + 2);

        let mut out = Vec::new();
        let at = begin_chunk(&mut out);
        end_chunk(&mut out, at, true);
        assert_eq!(out, b"0\r\n\r\n");

        let mut buf = [0u8; SIZE_ROOM];
        for (n, text) in [
            (0u64, "0"),
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (u64::MAX, "ffffffffffffffff"),
        ] {
            let d = format_hex(&mut buf, n);
            assert_eq!(&buf[..d], text.as_bytes());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any canonical chunked body, split anywhere: decoded to its data, its end found
        /// exactly; re-encoded, it decodes to the same data.
        #[test]
        fn any_body_decodes_and_reencodes(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300), 0..8),
            ext in proptest::bool::ANY,
            trailers in proptest::collection::vec("[a-z]{1,8}: [a-z0-9]{0,8}", 0..3),
            piece in 1usize..64,
        ) {
            let mut body = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:X}", c.len()).as_bytes());
                if ext {
                    body.extend_from_slice(b";name=value");
                }
                body.extend_from_slice(b"\r\n");
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            for t in &trailers {
                body.extend_from_slice(t.as_bytes());
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"\r\n");
            let end = body.len();
            body.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let data: Vec<u8> = chunks.concat();
            let decoded = decode_in_pieces(&body, piece);
            proptest::prop_assert_eq!(decoded.clone(), Ok((data.clone(), Some(end))));

            let mut framed = Vec::new();
            let at = begin_chunk(&mut framed);
            framed.extend_from_slice(&data);
            end_chunk(&mut framed, at, true);
            proptest::prop_assert_eq!(decode_in_pieces(&framed, piece), Ok((data, Some(framed.len()))));
        }
    }
}
