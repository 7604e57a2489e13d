//! The protocol servers: Modbus TCP (line-side.md §5.2), Modbus RTU on a serial port (§5.1) and
//! the serial ASCII protocol (§4). Each runs on its own thread and talks to the arbiter through a
//! [`LineHandle`]; none can block inspection.

use super::arbiter::{Command, LineHandle, Sink};
use super::config::SelectKind;
use super::modbus::{handle_pdu, rtu_frame, RtuDecoder, RtuEvent, Write};
use super::status::{Coil, Health, LineState, ResultRecord, Status};
use std::fs::File;
use std::io::{self, Read, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Apply a Modbus write: coils and the COMMAND register become triggers and commands;
/// PRODUCT_SELECT (101) switches the product once the arbiter agrees, or answers its refusal
/// as the exception (03 unknown id, 04 Faulted, 02 products selected another way).
pub fn apply_write(w: Write, h: &LineHandle) -> Result<(), u8> {
    match w {
        Write::Coil(Coil::Trigger, true) => h.trigger(),
        Write::Coil(Coil::Online, on) => h.command(Command::Online(on)),
        Write::Coil(Coil::ClearCounters, true) => h.command(Command::ClearCounters),
        Write::Coil(Coil::FaultAck, true) => h.command(Command::FaultAck),
        Write::Coil(_, false) => {}
        Write::Register(100, 1) => h.command(Command::ClearCounters),
        Write::Register(100, 2) => h.command(Command::FaultAck),
        Write::Register(100, 3) => h.command(Command::Online(true)),
        Write::Register(100, 4) => h.command(Command::Online(false)),
        Write::Register(101, id) => {
            return h
                .select_product(id, SelectKind::Modbus)
                .map_err(|e| e.exception())
        }
        // handle_pdu refuses every other address and value (exceptions 02, 03).
        Write::Register(a, v) => {
            log::warn!("modbus: register {a} = {v} refused");
            return Err(super::modbus::ILLEGAL_ADDRESS);
        }
    }
    Ok(())
}

/// Open a serial device (or pty) raw, at `baud`, with reads that return after 100 ms of silence.
pub fn open_serial(path: &Path, baud: u32) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    let fd = f.as_raw_fd();
    let speed = match baud {
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        b => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("baud {b} not supported"),
            ))
        }
    };
    // SAFETY: termios is plain data; fd is open for the lifetime of `f`.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        t.c_cflag |= libc::CLOCAL | libc::CREAD;
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 1;
        libc::cfsetispeed(&mut t, speed);
        libc::cfsetospeed(&mut t, speed);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// Limits of the Modbus TCP server (docs/line.md "Modbus TCP"): any machine on the plant network
/// can open connections, so they are few, and idle ones are closed.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// Connections open at most; a new one closes the one idle longest.
    pub max_connections: usize,
    /// A connection with no complete request for this long is closed.
    pub idle_timeout: Duration,
}

struct Conn {
    id: u64,
    stream: TcpStream,
    last_ms: Arc<AtomicU64>,
}

/// Modbus TCP: a thread per connection, at most `limits.max_connections` of them (the one idle
/// longest is closed to make room: a PLC that polls stays, a forgotten or hostile one goes), each
/// closed after `limits.idle_timeout` without a request. Accept errors (out of descriptors) back
/// off from 10 ms to 1 s instead of spinning. Unit ids 0, 255 and `unit` are answered, others
/// are ignored; a frame with another protocol id or an impossible length closes the connection.
pub fn serve_tcp(
    listener: TcpListener,
    h: LineHandle,
    unit: u8,
    high_word_first: bool,
    limits: TcpLimits,
) {
    let epoch = Instant::now();
    let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let health = h.health().clone();
    let mut backoff = Duration::from_millis(10);
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                log::warn!("modbus tcp: accept: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let now_ms = epoch.elapsed().as_millis() as u64;
        let last_ms = Arc::new(AtomicU64::new(now_ms));
        let Ok(handle_stream) = stream.try_clone() else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        {
            let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
            while list.len() >= limits.max_connections.max(1) {
                let oldest = (0..list.len())
                    .min_by_key(|&i| list[i].last_ms.load(Ordering::Relaxed))
                    .expect("list is not empty");
                let c = list.swap_remove(oldest);
                let _ = c.stream.shutdown(Shutdown::Both);
                health.tcp_dropped.fetch_add(1, Ordering::Relaxed);
                log::info!("modbus tcp: connection limit reached, closing the one idle longest");
            }
            list.push(Conn {
                id,
                stream: handle_stream,
                last_ms: last_ms.clone(),
            });
            health
                .tcp_connections
                .store(list.len() as u32, Ordering::Relaxed);
        }
        let h = h.clone();
        let conns_of_thread = conns.clone();
        let spawned = std::thread::Builder::new()
            .name("edge-ad-modbus-tcp".into())
            .spawn(move || {
                let r = tcp_connection(
                    stream,
                    &h,
                    unit,
                    high_word_first,
                    limits,
                    |ms| last_ms.store(ms, Ordering::Relaxed),
                    epoch,
                );
                match r {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        h.health().tcp_dropped.fetch_add(1, Ordering::Relaxed);
                        log::debug!("modbus tcp: idle connection closed");
                    }
                    Err(e) => log::debug!("modbus tcp connection ended: {e}"),
                    Ok(()) => {}
                }
                let mut list = conns_of_thread.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|c| c.id != id);
                h.health()
                    .tcp_connections
                    .store(list.len() as u32, Ordering::Relaxed);
            });
        if spawned.is_err() {
            let mut list = conns.lock().unwrap_or_else(|p| p.into_inner());
            list.retain(|c| c.id != id);
            std::thread::sleep(backoff);
        }
    }
}

/// Why a Modbus TCP stream is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MbapError {
    /// Protocol id not 0: not Modbus.
    Protocol(u16),
    /// Length outside 2..=260.
    Length(usize),
}

impl std::fmt::Display for MbapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MbapError::Protocol(p) => write!(f, "MBAP protocol {p}: not Modbus, closing"),
            MbapError::Length(l) => write!(f, "MBAP length {l}: impossible, closing"),
        }
    }
}

/// The PDU length (bytes after the unit id) an MBAP header announces. 254 is the largest legal
/// length; up to 260 is read and answered (exception 03 for an oversized write) rather than
/// dropping the connection.
pub fn mbap_pdu_len(mbap: &[u8; 7]) -> Result<usize, MbapError> {
    let proto = u16::from_be_bytes([mbap[2], mbap[3]]);
    let len = u16::from_be_bytes([mbap[4], mbap[5]]) as usize;
    if proto != 0 {
        return Err(MbapError::Protocol(proto));
    }
    if !(2..=260).contains(&len) {
        return Err(MbapError::Length(len));
    }
    Ok(len - 1)
}

/// The answer to one MBAP request (`None`: another unit id, no answer).
pub fn tcp_response(
    mbap: &[u8; 7],
    pdu: &[u8],
    unit: u8,
    st: &Status,
    apply: impl FnMut(Write) -> Result<(), u8>,
) -> Option<Vec<u8>> {
    let id = mbap[6];
    if id != unit && id != 0 && id != 255 {
        return None;
    }
    let resp = handle_pdu(pdu, &st.registers(), apply);
    let mut out = Vec::with_capacity(7 + resp.len());
    out.extend_from_slice(&mbap[..4]);
    out.extend(((resp.len() + 1) as u16).to_be_bytes());
    out.push(id);
    out.extend(resp);
    Some(out)
}

fn tcp_connection(
    mut s: TcpStream,
    h: &LineHandle,
    unit: u8,
    hwf: bool,
    limits: TcpLimits,
    touch: impl Fn(u64),
    epoch: Instant,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(limits.idle_timeout))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut pdu = [0u8; 260];
    loop {
        let mut mbap = [0u8; 7];
        s.read_exact(&mut mbap)?;
        let n = mbap_pdu_len(&mbap)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        s.read_exact(&mut pdu[..n])?;
        touch(epoch.elapsed().as_millis() as u64);
        let mut st = h.status();
        st.high_word_first = hwf;
        if let Some(out) = tcp_response(&mbap, &pdu[..n], unit, &st, |w| apply_write(w, h)) {
            s.write_all(&out)?;
        }
    }
}

/// Reopen backoff of a vanished serial port: 100 ms doubling to 5 s.
const REOPEN_MIN: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// Which port a [`SerialPort`] is, for the PORT_LOST bit.
#[derive(Debug, Clone, Copy)]
pub enum PortRole {
    /// The serial ASCII protocol.
    Serial = 0,
    /// Modbus RTU.
    Rtu = 1,
}

/// A serial port that can vanish (a USB adapter unplugged) and come back: the reading thread
/// reopens it with backoff, and the writer half is swapped with it. Writes never block for
/// long: the writer is non-blocking and waits at most [`WRITE_TIMEOUT`] for room, so a peer
/// that stops reading costs lines (counted), never the line.
pub struct SerialPort {
    path: PathBuf,
    baud: u32,
    role: PortRole,
    writer: Mutex<Option<File>>,
}

/// How long a write to a serial port may wait for the peer to read.
pub const WRITE_TIMEOUT: Duration = Duration::from_millis(250);

impl SerialPort {
    /// Open `path` (reader and non-blocking writer). Errors name nothing: the caller adds the
    /// config field.
    pub fn open(path: &Path, baud: u32, role: PortRole) -> io::Result<(Arc<Self>, File)> {
        let (r, w) = open_pair(path, baud)?;
        Ok((
            Arc::new(Self {
                path: path.to_path_buf(),
                baud,
                role,
                writer: Mutex::new(Some(w)),
            }),
            r,
        ))
    }

    /// A port that is missing at start: its bit in [`Health::ports_lost`] is set now (the
    /// self-test sees it), and its server reopens it with backoff (error 0x0501 meanwhile).
    pub fn missing(path: &Path, baud: u32, role: PortRole, health: &Health) -> Arc<Self> {
        health
            .ports_lost
            .fetch_or(1 << role as u32, Ordering::SeqCst);
        Arc::new(Self {
            path: path.to_path_buf(),
            baud,
            role,
            writer: Mutex::new(None),
        })
    }

    /// The reader: `reader`, or the port reopened (with backoff) when it was missing at start.
    fn reader(&self, reader: Option<File>, h: &LineHandle) -> File {
        match reader {
            Some(r) => r,
            None => self.reopen(h, "missing at start", crate::status::code::SERIAL_OPEN),
        }
    }

    /// Write `bytes`, waiting at most [`WRITE_TIMEOUT`] for the peer. An error when the port is
    /// gone or the peer does not read.
    pub fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let mut g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(f) = g.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "port is gone"));
        };
        write_with_timeout(f, bytes, WRITE_TIMEOUT)
    }

    /// Mark the port gone, then reopen it with backoff until it is back or `stop` says so;
    /// the line is Faulted (PORT_LOST) meanwhile. Returns the new reader.
    fn reopen(&self, h: &LineHandle, why: &str, code: u16) -> File {
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let bit = 1u32 << self.role as u32;
        h.health().ports_lost.fetch_or(bit, Ordering::SeqCst);
        h.port_lost(Some(code));
        log::error!("{}: {why}; reopening", self.path.display());
        let mut wait = REOPEN_MIN;
        loop {
            std::thread::sleep(wait);
            match open_pair(&self.path, self.baud) {
                Ok((r, w)) => {
                    *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
                    h.health().ports_lost.fetch_and(!bit, Ordering::SeqCst);
                    h.port_lost(None);
                    log::warn!(
                        "{}: reopened; FAULT_ACK returns the line to work",
                        self.path.display()
                    );
                    return r;
                }
                Err(e) => {
                    log::debug!("{}: still gone: {e}", self.path.display());
                    wait = (wait * 2).min(REOPEN_MAX);
                }
            }
        }
    }

    /// Read into `buf`: `Ok(0)` after 100 ms of silence; a vanished port (read error, or the
    /// node gone) is reopened first.
    ///
    /// A hung-up tty (adapter unplugged, the node not yet removed) returns 0 at once instead of
    /// after 100 ms of silence: three such reads in a row count as gone too.
    fn read(&self, port: &mut File, buf: &mut [u8], h: &LineHandle) -> usize {
        let lost = crate::status::code::SERIAL_LOST;
        let mut quick_zeros = 0;
        loop {
            let t0 = Instant::now();
            match port.read(buf) {
                Ok(0) => {
                    if !self.path.exists() {
                        *port = self.reopen(h, "device node gone", lost);
                    } else if t0.elapsed() < Duration::from_millis(20) {
                        quick_zeros += 1;
                        if quick_zeros >= 3 {
                            *port = self.reopen(h, "hung up", lost);
                            quick_zeros = 0;
                        }
                    } else {
                        return 0;
                    }
                }
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => *port = self.reopen(h, &format!("read error {e}"), lost),
            }
        }
    }
}

fn open_pair(path: &Path, baud: u32) -> io::Result<(File, File)> {
    let r = open_serial(path, baud)?;
    let w = open_serial(path, baud)?;
    // SAFETY: fcntl on an fd owned by `w`.
    unsafe {
        let fd = w.as_raw_fd();
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((r, w))
}

/// Write all of `bytes` to a non-blocking `f`, polling for room at most `timeout` in all.
pub fn write_with_timeout(f: &mut File, mut bytes: &[u8], timeout: Duration) -> io::Result<()> {
    let end = Instant::now() + timeout;
    while !bytes.is_empty() {
        match f.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer does not read",
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 1000) as libc::c_int) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Modbus RTU slave on a serial port: answers `unit`, applies broadcast (0) writes silently,
/// ignores other ids while staying in sync, resynchronises after garbage; a port that vanishes
/// is reopened with backoff (the line is Faulted with 0x0502 meanwhile).
pub fn serve_rtu(
    port: Arc<SerialPort>,
    reader: Option<File>,
    h: LineHandle,
    unit: u8,
    high_word_first: bool,
) {
    let mut reader = port.reader(reader, &h);
    let mut dec = RtuDecoder::default();
    let mut buf = [0u8; 256];
    loop {
        match port.read(&mut reader, &mut buf, &h) {
            0 => {
                // 100 ms of silence: longer than any frame gap; a partial frame is dropped.
                if dec.silence() > 0 {
                    log::debug!("modbus rtu: partial frame dropped after silence");
                }
                continue;
            }
            n => dec.push(&buf[..n]),
        }
        while let Some(ev) = dec.next_event() {
            match ev {
                RtuEvent::Dropped(n) => log::debug!("modbus rtu: {n} bytes dropped (resync)"),
                RtuEvent::Request(id, pdu) => {
                    if id != unit && id != 0 {
                        continue;
                    }
                    let mut st = h.status();
                    st.high_word_first = high_word_first;
                    let resp = handle_pdu(&pdu, &st.registers(), |w| apply_write(w, &h));
                    if id == unit {
                        if let Err(e) = port.write(&rtu_frame(unit, &resp)) {
                            h.health().outputs_dropped.fetch_add(1, Ordering::Relaxed);
                            log::warn!("modbus rtu: answer not sent: {e}");
                        }
                    }
                }
            }
        }
    }
}

/// Result lines of the serial ASCII protocol: `<tag>,<OK|NG|ERR>,<score>,<ms>\r\n`.
pub struct SerialSink(pub Arc<SerialPort>, pub Arc<crate::status::Health>);

/// Format one result line.
pub fn result_line(r: &ResultRecord) -> String {
    let score = if r.score.is_finite() && r.outcome != super::status::Outcome::Err {
        format!("{:.3}", r.score)
    } else {
        "-1.000".into()
    };
    format!("{},{},{score},{}\r\n", r.tag, r.outcome.word(), r.ms)
}

impl Sink for SerialSink {
    fn emit(&mut self, r: &ResultRecord) {
        if let Err(e) = self.0.write(result_line(r).as_bytes()) {
            let n = self.1.outputs_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                log::error!("serial: result line for tag {} not sent: {e}", r.tag);
            }
        }
    }
}

/// A command of the serial ASCII protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialCommand {
    /// `TRIG`.
    Trig,
    /// `PING`.
    Ping,
    /// `RESET`.
    Reset,
    /// `STATUS?`.
    Status,
    /// `PRODUCT <id>`: select a product.
    Product(u16),
    /// `PRODUCT <x>` where x is not a number 0–65535.
    BadProduct,
    /// `PRODUCT?`: the active product.
    ProductQuery,
    /// Anything else.
    Unknown,
    /// A line over 64 bytes.
    TooLong,
}

/// The serial command parser: lines end with CR, LF or CR LF; at most 64 bytes (longer input is
/// discarded to the next terminator and reported as [`SerialCommand::TooLong`]). Holds at most
/// 64 bytes whatever it is fed.
#[derive(Debug, Default)]
pub struct SerialParser {
    line: Vec<u8>,
    too_long: bool,
}

impl SerialParser {
    /// Feed one byte; a complete line gives its command.
    pub fn push(&mut self, b: u8) -> Option<SerialCommand> {
        if b == b'\r' || b == b'\n' {
            let cmd = if self.too_long {
                Some(SerialCommand::TooLong)
            } else if self.line.is_empty() {
                None
            } else {
                Some(match self.line.as_slice() {
                    b"TRIG" => SerialCommand::Trig,
                    b"PING" => SerialCommand::Ping,
                    b"RESET" => SerialCommand::Reset,
                    b"STATUS?" => SerialCommand::Status,
                    b"PRODUCT?" => SerialCommand::ProductQuery,
                    l => match l.strip_prefix(b"PRODUCT ") {
                        Some(arg) => std::str::from_utf8(arg)
                            .ok()
                            .filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|a| a.parse().ok())
                            .map_or(SerialCommand::BadProduct, SerialCommand::Product),
                        None => SerialCommand::Unknown,
                    },
                })
            };
            self.line.clear();
            self.too_long = false;
            cmd
        } else {
            if self.line.len() >= 64 {
                self.too_long = true;
            } else {
                self.line.push(b);
            }
            None
        }
    }
}

/// The serial command reader: `TRIG`, `STATUS?`, `PING`, `RESET` (see [`SerialParser`]); a
/// port that vanishes is reopened with backoff.
pub fn serve_serial_commands(port: Arc<SerialPort>, reader: Option<File>, h: LineHandle) {
    let mut reader = port.reader(reader, &h);
    let mut parser = SerialParser::default();
    let mut buf = [0u8; 128];
    let reply = |s: &str| {
        if let Err(e) = port.write(format!("{s}\r\n").as_bytes()) {
            h.health().outputs_dropped.fetch_add(1, Ordering::Relaxed);
            log::warn!("serial: reply not sent: {e}");
        }
    };
    loop {
        let n = port.read(&mut reader, &mut buf, &h);
        for &b in &buf[..n] {
            match parser.push(b) {
                None => {}
                Some(SerialCommand::Trig) => h.trigger(),
                Some(SerialCommand::Ping) => reply("!PONG"),
                Some(SerialCommand::Reset) => {
                    h.command(Command::ClearCounters);
                    reply("!OK");
                }
                Some(SerialCommand::Status) => {
                    let s = h.status();
                    let c = s.counters;
                    reply(&format!(
                        "!STATUS,{},{},{},{},{},{},{}",
                        state_word(s.state),
                        u8::from(s.state.ready()),
                        c.triggers,
                        c.ok,
                        c.ng,
                        c.faults,
                        c.overruns
                    ));
                }
                Some(SerialCommand::Product(id)) => {
                    match h.select_product(id, SelectKind::Serial) {
                        Ok(()) => reply("!OK"),
                        Err(e) => reply(&format!("!ERR,{}", e.word())),
                    }
                }
                Some(SerialCommand::BadProduct) => reply("!ERR,BAD_PRODUCT_ID"),
                Some(SerialCommand::ProductQuery) => {
                    let s = h.status();
                    let p = s.active_product();
                    reply(&format!("!PRODUCT,{},{}", p.id, p.name));
                }
                Some(SerialCommand::Unknown) => reply("!ERR,UNKNOWN_COMMAND"),
                Some(SerialCommand::TooLong) => reply("!ERR,LINE_TOO_LONG"),
            }
        }
    }
}

/// The state's name in protocol replies.
pub fn state_word(s: LineState) -> &'static str {
    match s {
        LineState::Booting => "BOOTING",
        LineState::SelfTest => "SELFTEST",
        LineState::Ready => "READY",
        LineState::Running => "RUNNING",
        LineState::Faulted => "FAULTED",
        LineState::Draining => "DRAINING",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Outcome;

    #[test]
    fn result_lines_follow_the_protocol() {
        let r = ResultRecord {
            tag: 1042,
            product: 1,
            outcome: Outcome::Ok,
            score: 0.1374,
            ms: 48,
            cause: None,
        };
        assert_eq!(result_line(&r), "1042,OK,0.137,48\r\n");
        let e = ResultRecord {
            outcome: Outcome::Err,
            score: f32::NAN,
            ms: 500,
            ..r
        };
        assert_eq!(result_line(&e), "1042,ERR,-1.000,500\r\n");
    }

    #[test]
    fn product_commands_parse_and_refuse_non_numbers() {
        let parse = |s: &str| {
            let mut p = SerialParser::default();
            s.bytes().chain([b'\r']).find_map(|b| p.push(b))
        };
        assert_eq!(parse("PRODUCT 12"), Some(SerialCommand::Product(12)));
        assert_eq!(parse("PRODUCT?"), Some(SerialCommand::ProductQuery));
        for bad in [
            "PRODUCT x",
            "PRODUCT ",
            "PRODUCT -1",
            "PRODUCT 70000",
            "PRODUCT 1 2",
        ] {
            assert_eq!(parse(bad), Some(SerialCommand::BadProduct), "{bad}");
        }
        assert_eq!(parse("PRODUCT"), Some(SerialCommand::Unknown));
    }
}
