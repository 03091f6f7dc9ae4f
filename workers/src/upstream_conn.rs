//! A connection to where a request is proxied: a peer over TCP, or the
//! master's admin API over its private unix socket.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

pub(crate) struct UpConn {
    /// Index of its token in the pool's table.
    pub id: usize,
    pub stream: Stream,
    /// The peer, for returning the connection to the pool.
    pub addr: Option<SocketAddr>,
    /// Taken from the pool (so a close before any answer is no failure).
    pub reused: bool,
    pub connected: bool,
    /// May have bytes to read (see `Session::mark_readable`).
    pub ready: bool,
    /// The peer shut down its side: read to the end regardless.
    pub hup: bool,
}

impl UpConn {
    pub fn connect(addr: SocketAddr, id: usize) -> io::Result<UpConn> {
        let s = TcpStream::connect(addr)?;
        let _ = s.set_nodelay(true);
        Ok(UpConn {
            id,
            stream: Stream::Tcp(s),
            addr: Some(addr),
            reused: false,
            connected: false,
            ready: true,
            hup: false,
        })
    }

    pub fn admin(path: &std::path::Path, id: usize) -> io::Result<UpConn> {
        Ok(UpConn {
            id,
            stream: Stream::Unix(UnixStream::connect(path)?),
            addr: None,
            reused: false,
            connected: false,
            ready: true,
            hup: false,
        })
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.stream, Stream::Tcp(_))
    }

    /// Whether a non-blocking connect has completed; an error if it failed.
    pub fn check_connected(&mut self) -> io::Result<bool> {
        if self.connected {
            return Ok(true);
        }
        let (err, peer) = match &self.stream {
            Stream::Tcp(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
            Stream::Unix(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
        };
        if let Some(e) = err {
            return Err(e);
        }
        match peer {
            Ok(()) => {
                self.connected = true;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(self, token, Interest::READABLE | Interest::WRITABLE)
    }
}

impl Read for UpConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for UpConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for UpConn {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
        }
    }
}
