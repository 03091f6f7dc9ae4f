//! Finding where a chunked body ends while passing its bytes through
//! verbatim (extensions and trailers included): the proxy forwards the
//! framing as it came and only needs to know when the message is over.

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad chunked framing")]
pub struct ChunkError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size {
        digits: u8,
    },
    /// After the size: extensions up to CR LF.
    Ext,
    SizeLf,
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines, then the empty line.
    TrailerStart,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// Tracks one chunked body; `size` accumulates the current chunk's size.
#[derive(Debug, Clone, Copy)]
pub struct ChunkedTracker {
    state: State,
    size: u64,
}

impl Default for ChunkedTracker {
    fn default() -> Self {
        ChunkedTracker {
            state: State::Size { digits: 0 },
            size: 0,
        }
    }
}

impl ChunkedTracker {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes body bytes from the start of `buf`; returns how many belong
    /// to this body (all of `buf` unless the body ends inside it).
    pub fn advance(&mut self, buf: &[u8]) -> Result<usize, ChunkError> {
        self.step(buf, None)
    }

    /// As [`advance`](Self::advance), appending only the chunks' data to
    /// `data` (for a client that cannot read chunked framing).
    pub fn decode(&mut self, buf: &[u8], data: &mut Vec<u8>) -> Result<usize, ChunkError> {
        self.step(buf, Some(data))
    }

    fn step(&mut self, buf: &[u8], mut data: Option<&mut Vec<u8>>) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data { left } => {
                    let take = (buf.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if let Some(d) = data.as_mut() {
                        d.extend_from_slice(&buf[i..i + take]);
                    }
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { left }
                    };
                    continue;
                }
                State::Size { digits } => match hex(b) {
                    Some(d) if digits < 16 => {
                        self.size = self.size << 4 | u64::from(d);
                        State::Size { digits: digits + 1 }
                    }
                    None if digits > 0 && (b == b';' || b == b' ' || b == b'\t') => State::Ext,
                    None if digits > 0 && b == b'\r' => State::SizeLf,
                    _ => return Err(ChunkError),
                },
                State::Ext => match b {
                    b'\r' => State::SizeLf,
                    b'\n' | 0 => return Err(ChunkError),
                    _ => State::Ext,
                },
                State::SizeLf if b == b'\n' => {
                    let size = std::mem::take(&mut self.size);
                    if size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data { left: size }
                    }
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size { digits: 0 },
                State::TrailerStart if b == b'\r' => State::TrailerLf { empty: true },
                State::TrailerStart | State::TrailerLine if b != b'\r' && b != b'\n' && b != 0 => {
                    State::TrailerLine
                }
                State::TrailerLine if b == b'\r' => State::TrailerLf { empty: false },
                State::TrailerLf { empty: true } if b == b'\n' => {
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::TrailerLf { empty: false } if b == b'\n' => State::TrailerStart,
                _ => return Err(ChunkError),
            };
            i += 1;
        }
        Ok(i)
    }
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_bytewise(body: &[u8]) -> Result<usize, ChunkError> {
        let mut t = ChunkedTracker::default();
        let mut used = 0;
        for b in body.chunks(1) {
            used += t.advance(b)?;
            if t.is_done() {
                break;
            }
        }
        Ok(used)
    }

    #[test]
    fn a_body_with_extensions_and_trailers_ends_where_it_should() {
        let body = b"5;name=v\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let mut t = ChunkedTracker::default();
        assert_eq!(t.advance(body), Ok(body.len() - 4));
        assert!(t.is_done());
        assert_eq!(run_bytewise(body), Ok(body.len() - 4));
    }

    #[test]
    fn bad_framing_is_an_error() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloX",
            b"\r\n",
            b"5\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert_eq!(run_bytewise(bad), Err(ChunkError), "{bad:?}");
        }
    }

    #[test]
    fn decoding_keeps_only_the_data() {
        let body = b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n";
        let mut t = ChunkedTracker::default();
        let mut data = Vec::new();
        for piece in body.chunks(3) {
            t.decode(piece, &mut data).expect("valid");
        }
        assert!(t.is_done());
        assert_eq!(data, b"hello world");
    }

    #[test]
    fn the_last_chunk_without_trailers() {
        let mut t = ChunkedTracker::default();
        assert_eq!(t.advance(b"0\r\n\r\n"), Ok(5));
        assert!(t.is_done());
    }
}
