//! A client connection: read buffer, parsed requests, responses queued for
//! writing. The routing issue turns the answer step into proxying; the read
//! and write halves stay as they are.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;

use crate::http::{self, BodyKind};

/// Read in steps of this much; the buffer grows only while a head is
/// incomplete, up to the header limit.
const READ_CHUNK: usize = 16 << 10;

/// What the loop should do with a connection after an event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Wait for more bytes (arm the idle or header deadline).
    Read,
    /// Bytes are queued: wait until the socket is writable.
    Write,
    Close,
}

pub(crate) struct ClientConn {
    pub stream: TcpStream,
    #[allow(dead_code)] // read by the proxy for X-Real-IP
    pub peer: SocketAddr,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Body bytes of the current request still to be skipped.
    discard: u64,
    close_after_write: bool,
    /// Whether a request is under way (for graceful stop).
    pub busy: bool,
    pub timer: u64,
}

pub(crate) struct Limits {
    pub max_header_size: usize,
}

impl ClientConn {
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        ClientConn {
            stream,
            peer,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            discard: 0,
            close_after_write: false,
            busy: false,
            timer: 0,
        }
    }

    /// Reads what the socket has and answers every complete request in it.
    pub fn on_readable(
        &mut self,
        limits: &Limits,
        answer: &mut impl FnMut(&[u8], &http::RequestHead) -> u16,
    ) -> Next {
        loop {
            let start = self.inbuf.len();
            self.inbuf.resize(start + READ_CHUNK, 0);
            match self.stream.read(&mut self.inbuf[start..]) {
                Ok(0) => {
                    self.inbuf.truncate(start);
                    return Next::Close;
                }
                Ok(n) => self.inbuf.truncate(start + n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.inbuf.truncate(start);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.inbuf.truncate(start),
                Err(_) => return Next::Close,
            }
            if self.inbuf.len() > limits.max_header_size + READ_CHUNK {
                break;
            }
        }
        self.process(limits, answer);
        self.flush()
    }

    fn process(
        &mut self,
        limits: &Limits,
        answer: &mut impl FnMut(&[u8], &http::RequestHead) -> u16,
    ) {
        let mut pos = 0;
        while !self.close_after_write {
            if self.discard > 0 {
                let n = (self.inbuf.len() - pos)
                    .min(usize::try_from(self.discard).unwrap_or(usize::MAX));
                pos += n;
                self.discard -= n as u64;
                if self.discard > 0 {
                    break;
                }
                self.busy = false;
            }
            let buf = &self.inbuf[pos..];
            if buf.is_empty() {
                break;
            }
            match http::parse_request(buf, limits.max_header_size) {
                Ok(None) => {
                    self.busy = true;
                    break;
                }
                Ok(Some(head)) => {
                    let status = answer(buf, &head);
                    pos += head.len;
                    let keep = head.keep_alive && head.body != BodyKind::Chunked;
                    http::write::error_page(&mut self.out, status, keep);
                    self.close_after_write = !keep;
                    if let BodyKind::Length(n) = head.body {
                        self.discard = n;
                        self.busy = true;
                    } else {
                        self.busy = false;
                    }
                }
                Err(e) => {
                    http::write::error_page(&mut self.out, e.status(), false);
                    self.close_after_write = true;
                    self.busy = false;
                }
            }
        }
        self.inbuf.drain(..pos);
    }

    /// Writes queued bytes until done or the socket is full.
    pub fn flush(&mut self) -> Next {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Next::Close,
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Write,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.close_after_write {
            Next::Close
        } else {
            Next::Read
        }
    }

    /// Whether the connection is idle between requests.
    pub fn is_idle(&self) -> bool {
        !self.busy && self.out.is_empty() && self.inbuf.is_empty()
    }
}
