//! PDU framing over a TCP stream (PS3.8 9.3.1): reads whole PDUs into one reusable
//! per-association buffer, with bounded waits so timeouts and shutdown are noticed.
//!
//! The buffer only grows as bytes actually arrive, up to the per-type limit, so a
//! peer announcing an absurd length costs nothing before it is refused.

use std::io::{self, Read};
use std::net::TcpStream;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use crate::pdu::{abort, parse_pdu_header, PduError, PDU_HEADER_LEN};

/// How often a blocked read wakes to check timeouts and shutdown.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why no PDU could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection between PDUs.
    Closed,
    /// The peer closed or reset the connection in the middle of a PDU, or the socket failed.
    Lost(String),
    /// The PDU header is invalid or its length exceeds what this state allows.
    Protocol { reason: u8, message: String },
    /// The caller's wait policy gave up (timeout, shutdown); the message says why.
    Stopped(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Closed => f.write_str("connection closed by peer"),
            ReadError::Lost(m) | ReadError::Stopped(m) => f.write_str(m),
            ReadError::Protocol { message, .. } => write!(f, "protocol error: {message}"),
        }
    }
}

/// What the wait policy is told each time a read times out.
pub struct Waiting {
    /// Time since the last byte arrived.
    pub idle: Duration,
    /// Bytes of an incomplete PDU are buffered.
    pub mid_pdu: bool,
}

/// The PDU at the start of some bytes.
#[derive(Debug)]
pub enum Framed {
    /// Whole, of this length (header included).
    Whole(usize),
    /// Not all there: this many bytes from its start are needed (first the header).
    Partial(usize),
}

/// Whole PDUs, each as (type, body), returned together by [`PduReader::next_pdus`];
/// their headers were checked when they were framed.
#[derive(Debug)]
pub struct Pdus<'r> {
    bytes: &'r [u8],
}

impl<'r> Iterator for Pdus<'r> {
    type Item = (u8, &'r [u8]);

    fn next(&mut self) -> Option<(u8, &'r [u8])> {
        // PS3.8 9.3.1: bytes 3-6 of the header are the PDU-length.
        let length = u32::from_be_bytes(self.bytes.get(2..PDU_HEADER_LEN)?.try_into().ok()?);
        let (pdu, rest) = self
            .bytes
            .split_at_checked(PDU_HEADER_LEN + length as usize)?;
        self.bytes = rest;
        Some((pdu[0], &pdu[PDU_HEADER_LEN..]))
    }
}

/// Reads PDUs from a stream into a reusable buffer.
pub struct PduReader {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the PDU returned last, released at the next call.
    consumed: usize,
    last_activity: Instant,
    /// When the wait policy was last consulted.
    last_consulted: Instant,
    /// How long to poll without sleeping before a read blocks (0: never).
    pub spin: Duration,
    /// The caller is in the middle of a message: what arrived so far is acknowledged
    /// before waiting for the rest (see [`PduReader::acknowledge_now`]).
    pub mid_message: bool,
}

impl PduReader {
    /// Wraps `stream` (whose read timeout must be set to [`POLL_INTERVAL`]); the buffer
    /// starts at `initial_capacity` bytes.
    pub fn new(stream: TcpStream, initial_capacity: usize) -> PduReader {
        PduReader {
            stream,
            buf: vec![0; initial_capacity.max(PDU_HEADER_LEN * 2)],
            start: 0,
            end: 0,
            consumed: 0,
            last_activity: Instant::now(),
            last_consulted: Instant::now(),
            spin: Duration::ZERO,
            mid_message: false,
        }
    }

    /// True when bytes of an unfinished PDU are buffered.
    pub fn has_partial(&self) -> bool {
        self.end > self.start + self.consumed
    }

    /// Returns the next whole PDU as (type, body). `limit(type)` is the largest body
    /// accepted for that type, or None when the type is not expected in this state.
    /// `wait` is consulted at least every [`POLL_INTERVAL`] while a PDU is awaited, whether
    /// bytes trickle in or not (so a deadline holds against a drip-feeding peer), and
    /// never while a whole PDU is buffered; returning Some(reason) abandons the read.
    pub fn next_pdu(
        &mut self,
        limit: &dyn Fn(u8) -> Option<usize>,
        wait: &mut dyn FnMut(Waiting) -> Option<String>,
    ) -> Result<(u8, &[u8]), ReadError> {
        let total = self.await_pdu(limit, wait)?;
        self.consumed = total;
        let pdu = &self.buf[self.start..self.start + total];
        Ok((pdu[0], &pdu[PDU_HEADER_LEN..]))
    }

    /// Like [`PduReader::next_pdu`], but returns every whole PDU already buffered after
    /// the first as well, so that the caller can write the data of several P-DATA-TF in
    /// one call. The batch ends before a PDU that is incomplete or invalid; the next
    /// call returns that one, or its error.
    pub fn next_pdus(
        &mut self,
        limit: &dyn Fn(u8) -> Option<usize>,
        wait: &mut dyn FnMut(Waiting) -> Option<String>,
    ) -> Result<Pdus<'_>, ReadError> {
        let mut total = self.await_pdu(limit, wait)?;
        while let Ok(Framed::Whole(next)) = self.frame_at(self.start + total, limit) {
            total += next;
        }
        self.consumed = total;
        Ok(Pdus {
            bytes: &self.buf[self.start..self.start + total],
        })
    }

    /// Releases the PDUs returned last, then reads until a whole, valid PDU starts the
    /// buffer; returns its length, header included.
    fn await_pdu(
        &mut self,
        limit: &dyn Fn(u8) -> Option<usize>,
        wait: &mut dyn FnMut(Waiting) -> Option<String>,
    ) -> Result<usize, ReadError> {
        self.start += self.consumed;
        self.consumed = 0;
        if self.start == self.end {
            // Nothing buffered: the next read goes to the front, whose cache lines are hot.
            (self.start, self.end) = (0, 0);
        }
        loop {
            match self.frame_at(self.start, limit)? {
                Framed::Whole(total) => return Ok(total),
                Framed::Partial(needed) => self.make_room(needed),
            }
            self.fill(wait)?;
        }
    }

    /// Frames the PDU buffered at `at` (see [`frame`]).
    fn frame_at(
        &self,
        at: usize,
        limit: &dyn Fn(u8) -> Option<usize>,
    ) -> Result<Framed, ReadError> {
        frame(&self.buf[at..self.end], limit)
    }

    /// Ensures the buffer can hold `needed` bytes from `start`: moves the partial PDU to
    /// the front, and grows (at most doubling, never beyond `needed`) when still short.
    fn make_room(&mut self, needed: usize) {
        if self.start + needed <= self.buf.len() {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if needed > self.buf.len() && self.end == self.buf.len() {
            let grown = (self.buf.len() * 2).min(needed);
            self.buf.resize(grown, 0);
        }
    }

    /// Reads what is available into the free space, waking every poll interval.
    fn fill(&mut self, wait: &mut dyn FnMut(Waiting) -> Option<String>) -> Result<(), ReadError> {
        // Bytes of a PDU are buffered (fill is only called while the first is partial).
        if self.mid_message || self.end > self.start {
            self.acknowledge_now();
        }
        if !self.spin.is_zero() && self.poll_briefly() {
            return Ok(());
        }
        loop {
            if self.last_consulted.elapsed() >= POLL_INTERVAL {
                self.consult(wait)?;
            }
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(if self.end == self.start {
                        ReadError::Closed
                    } else {
                        ReadError::Lost("connection closed in the middle of a PDU".into())
                    })
                }
                Ok(n) => {
                    self.end += n;
                    self.last_activity = Instant::now();
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.consult(wait)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Lost(format!("connection lost: {e}"))),
            }
        }
    }

    /// Polls the socket without sleeping for up to `spin`: when the peer answers within
    /// microseconds, this thread need not be woken (a context switch and, in a virtual
    /// machine, an inter-processor interrupt for the sender). True when bytes arrived.
    fn poll_briefly(&mut self) -> bool {
        let deadline = Instant::now() + self.spin;
        let free = &mut self.buf[self.end..];
        loop {
            // SAFETY: recv writes at most `free.len()` bytes into `free`, which is
            // borrowed mutably for the call; the descriptor stays open (owned by stream).
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    free.as_mut_ptr().cast(),
                    free.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match n {
                0 => return false,
                n if n > 0 => {
                    self.end += n as usize;
                    self.last_activity = Instant::now();
                    return true;
                }
                _ => {
                    let err = io::Error::last_os_error();
                    match err.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
                        _ => return false,
                    }
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Acknowledges what has arrived now instead of after the delayed-ACK timeout. A
    /// peer without TCP_NODELAY that writes a message in pieces (the command PDU, then
    /// the data set's, or a PDU's header, then its body) holds each piece back (Nagle's
    /// algorithm) until the one before is acknowledged; since our responses make the
    /// connection look interactive to the kernel, it would delay that ACK by 40 ms or
    /// more, once per message. TCP_QUICKACK sends a pending ACK at once.
    fn acknowledge_now(&self) {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, which lives
        // through the call; the descriptor stays open (owned by stream). A failure only
        // leaves the ACK delayed.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }

    fn consult(
        &mut self,
        wait: &mut dyn FnMut(Waiting) -> Option<String>,
    ) -> Result<(), ReadError> {
        self.last_consulted = Instant::now();
        let waiting = Waiting {
            idle: self.last_activity.elapsed(),
            mid_pdu: self.end > self.start,
        };
        match wait(waiting) {
            Some(why) => Err(ReadError::Stopped(why)),
            None => Ok(()),
        }
    }
}

/// Frames the PDU at the start of `bytes`: its header is checked against `limit` (the
/// largest body accepted per PDU type, None for a type not expected) as soon as the
/// header is there, before any of its body.
pub fn frame(bytes: &[u8], limit: &dyn Fn(u8) -> Option<usize>) -> Result<Framed, ReadError> {
    let Some(header) = bytes.first_chunk::<PDU_HEADER_LEN>() else {
        return Ok(Framed::Partial(PDU_HEADER_LEN));
    };
    let (pdu_type, length) = parse_pdu_header(header).map_err(protocol)?;
    let length = length as usize;
    let max = limit(pdu_type).ok_or_else(|| ReadError::Protocol {
        reason: abort::UNEXPECTED_PDU,
        message: format!("unexpected PDU type 0x{pdu_type:02X} in this state"),
    })?;
    if length > max {
        return Err(ReadError::Protocol {
            reason: abort::INVALID_PDU_PARAMETER_VALUE,
            message: format!("PDU type 0x{pdu_type:02X} length {length} exceeds the maximum {max}"),
        });
    }
    let total = PDU_HEADER_LEN + length;
    Ok(if bytes.len() >= total {
        Framed::Whole(total)
    } else {
        Framed::Partial(total)
    })
}

fn protocol(e: PduError) -> ReadError {
    ReadError::Protocol {
        reason: e.abort_reason(),
        message: e.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, PduReader) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        (client, PduReader::new(server, 16))
    }

    fn any(_: u8) -> Option<usize> {
        Some(1 << 20)
    }

    #[test]
    fn reads_pdus_split_and_coalesced() {
        let (mut client, mut reader) = pair();
        // Two A-RELEASE-RQ PDUs (PS3.8 9.3.6: type 05, reserved, length 4, 4 reserved)
        // and the first 3 bytes of a P-DATA-TF with a 40-byte body.
        let mut bytes = vec![5, 0, 0, 0, 0, 4, 0, 0, 0, 0, 5, 0, 0, 0, 0, 4, 0, 0, 0, 0];
        bytes.extend_from_slice(&[4, 0, 0]);
        client.write_all(&bytes).unwrap();
        let mut never = |_: Waiting| None;
        let (t, body) = reader.next_pdu(&any, &mut never).unwrap();
        assert_eq!((t, body.len()), (5, 4));
        let (t, _) = reader.next_pdu(&any, &mut never).unwrap();
        assert_eq!(t, 5);
        client.write_all(&[0, 0, 40]).unwrap();
        client.write_all(&[7u8; 40]).unwrap();
        let (t, body) = reader.next_pdu(&any, &mut never).unwrap();
        assert_eq!((t, body), (4, &[7u8; 40][..]));
        drop(client);
        assert!(matches!(
            reader.next_pdu(&any, &mut never),
            Err(ReadError::Closed)
        ));
    }

    /// Every whole PDU buffered comes in one batch; a partial one waits for the next
    /// call, and an invalid header after valid PDUs is refused only once they are out.
    #[test]
    fn batch_holds_the_whole_pdus_buffered() {
        let (mut client, mut reader) = pair();
        // Two P-DATA-TF (PS3.8 9.3.5: type 04, reserved, length) with 2- and 3-byte
        // bodies, an A-RELEASE-RQ (type 05, length 4), then 4 bytes of a P-DATA-TF.
        let mut bytes = vec![4, 0, 0, 0, 0, 2, 1, 2, 4, 0, 0, 0, 0, 3, 3, 4, 5];
        bytes.extend_from_slice(&[5, 0, 0, 0, 0, 4, 0, 0, 0, 0, 4, 0, 0, 0]);
        client.write_all(&bytes).unwrap();
        let mut never = |_: Waiting| None;
        let mut batch = Vec::new();
        while batch.len() < 3 {
            let pdus = reader.next_pdus(&any, &mut never).unwrap();
            batch.extend(pdus.map(|(t, body)| (t, body.to_vec())));
        }
        assert_eq!(
            batch,
            [(4, vec![1, 2]), (4, vec![3, 4, 5]), (5, vec![0, 0, 0, 0])]
        );
        // The rest of the P-DATA-TF (length 1), then an unknown PDU type.
        client.write_all(&[0, 1, 9, 0x42, 0, 0, 0, 0, 0]).unwrap();
        let pdus: Vec<_> = reader.next_pdus(&any, &mut never).unwrap().collect();
        assert_eq!(pdus, [(4, &[9u8][..])]);
        let err = reader.next_pdus(&any, &mut never).unwrap_err();
        assert!(matches!(err, ReadError::Protocol { reason: 1, .. }));
    }

    /// Polling before a read blocks changes nothing in what is read: a PDU that arrives
    /// after the poll gave up is still read by the blocking read, and EOF is EOF.
    #[test]
    fn polling_reader_reads_the_same() {
        let (mut client, mut reader) = pair();
        reader.spin = Duration::from_millis(2);
        let mut never = |_: Waiting| None;
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            client.write_all(&[5, 0, 0, 0, 0, 4, 0, 0, 0, 0]).unwrap();
            client.write_all(&[5, 0, 0]).unwrap();
            client.write_all(&[0, 0, 4, 0, 0, 0, 0]).unwrap();
            client
        });
        let (t, body) = reader.next_pdu(&any, &mut never).unwrap();
        assert_eq!((t, body.len()), (5, 4));
        let (t, _) = reader.next_pdu(&any, &mut never).unwrap();
        assert_eq!(t, 5);
        drop(late.join().unwrap());
        assert!(matches!(
            reader.next_pdu(&any, &mut never),
            Err(ReadError::Closed)
        ));
    }

    #[test]
    fn refuses_oversize_and_unexpected_types_before_reading_body() {
        let (mut client, mut reader) = pair();
        client.write_all(&[4, 0, 0xFF, 0xFF, 0xFF, 0xFF]).unwrap();
        let limit = |t: u8| (t == 4).then_some(1024);
        let err = reader.next_pdu(&limit, &mut |_| None).unwrap_err();
        assert!(matches!(err, ReadError::Protocol { reason: 6, .. }));
        assert!(reader.buf.len() < 1024);

        let (mut client, mut reader) = pair();
        client.write_all(&[2, 0, 0, 0, 0, 4]).unwrap();
        let err = reader.next_pdu(&limit, &mut |_| None).unwrap_err();
        assert!(matches!(err, ReadError::Protocol { reason: 2, .. }));

        let (mut client, mut reader) = pair();
        client.write_all(&[0x42, 0, 0, 0, 0, 4]).unwrap();
        let err = reader.next_pdu(&limit, &mut |_| None).unwrap_err();
        assert!(matches!(err, ReadError::Protocol { reason: 1, .. }));
    }

    /// A peer sending a byte more often than the poll interval still meets the policy.
    #[test]
    fn wait_policy_consulted_while_bytes_trickle() {
        let (mut client, mut reader) = pair();
        // A P-DATA-TF header announcing 1000 bytes, then its body a byte at a time.
        client.write_all(&[4, 0, 0, 0, 0x03, 0xE8]).unwrap();
        let drip = std::thread::spawn(move || {
            for _ in 0..40 {
                if client.write_all(&[1]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let started = Instant::now();
        let err = reader
            .next_pdu(&any, &mut |_| {
                (started.elapsed() >= POLL_INTERVAL).then(|| "deadline".to_string())
            })
            .unwrap_err();
        assert!(matches!(err, ReadError::Stopped(ref s) if s == "deadline"));
        assert!(started.elapsed() < Duration::from_millis(350));
        drop(reader);
        drip.join().unwrap();
    }

    #[test]
    fn wait_policy_and_truncation() {
        let (mut client, mut reader) = pair();
        client.write_all(&[5, 0, 0]).unwrap();
        let mut calls = 0;
        let err = reader
            .next_pdu(&any, &mut |w: Waiting| {
                calls += 1;
                assert!(w.mid_pdu);
                (calls == 2).then(|| "idle".to_string())
            })
            .unwrap_err();
        assert!(matches!(err, ReadError::Stopped(ref s) if s == "idle"));
        drop(client);
        assert!(matches!(
            reader.next_pdu(&any, &mut |_| None),
            Err(ReadError::Lost(_))
        ));
    }
}
