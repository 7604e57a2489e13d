//! The protocol servers: Modbus TCP (line-side.md §5.2), Modbus RTU on a serial port (§5.1) and
//! the serial ASCII protocol (§4). Each runs on its own thread and talks to the arbiter through a
//! [`LineHandle`]; none can block inspection.

use super::arbiter::{Command, LineHandle, Sink};
use super::modbus::{handle_pdu, rtu_frame, RtuDecoder, RtuEvent, Write};
use super::status::{Coil, LineState, ResultRecord};
use std::fs::File;
use std::io::{self, Read, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Apply a Modbus write: coils and the COMMAND register become triggers and commands.
pub fn apply_write(w: Write, h: &LineHandle) {
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
        Write::Register(a, v) => log::warn!("modbus: register {a} = {v} ignored (unsupported)"),
    }
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

/// Modbus TCP: one thread per connection. Unit ids 0, 255 and `unit` are answered, others are
/// ignored; a frame with another protocol id or an impossible length closes the connection.
pub fn serve_tcp(listener: TcpListener, h: LineHandle, unit: u8, high_word_first: bool) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let h = h.clone();
        let _ = std::thread::Builder::new()
            .name("edge-ad-modbus-tcp".into())
            .spawn(move || {
                if let Err(e) = tcp_connection(stream, &h, unit, high_word_first) {
                    log::debug!("modbus tcp connection ended: {e}");
                }
            });
    }
}

fn tcp_connection(mut s: TcpStream, h: &LineHandle, unit: u8, hwf: bool) -> io::Result<()> {
    s.set_nodelay(true)?;
    loop {
        let mut mbap = [0u8; 7];
        s.read_exact(&mut mbap)?;
        let proto = u16::from_be_bytes([mbap[2], mbap[3]]);
        let len = u16::from_be_bytes([mbap[4], mbap[5]]) as usize;
        // 254 is the largest legal length; up to 260 is read and answered (exception 03 for an
        // oversized write) rather than dropping the connection.
        if proto != 0 || !(2..=260).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("MBAP protocol {proto}, length {len}: not Modbus, closing"),
            ));
        }
        let mut pdu = vec![0u8; len - 1];
        s.read_exact(&mut pdu)?;
        let id = mbap[6];
        if id != unit && id != 0 && id != 255 {
            continue;
        }
        let mut st = h.status();
        st.high_word_first = hwf;
        let resp = handle_pdu(&pdu, &st.registers(), |w| apply_write(w, h));
        let mut out = Vec::with_capacity(7 + resp.len());
        out.extend_from_slice(&mbap[..4]);
        out.extend(((resp.len() + 1) as u16).to_be_bytes());
        out.push(id);
        out.extend(resp);
        s.write_all(&out)?;
    }
}

/// Modbus RTU slave on an open serial port: answers `unit`, applies broadcast (0) writes
/// silently, ignores other ids while staying in sync, resynchronises after garbage.
pub fn serve_rtu(mut port: File, h: LineHandle, unit: u8, high_word_first: bool) {
    let mut dec = RtuDecoder::default();
    let mut buf = [0u8; 256];
    loop {
        match port.read(&mut buf) {
            Ok(0) => {
                // 100 ms of silence: longer than any frame gap; a partial frame is dropped.
                if dec.silence() > 0 {
                    log::debug!("modbus rtu: partial frame dropped after silence");
                }
                continue;
            }
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("modbus rtu: read error {e}; stopping the RTU server");
                return;
            }
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
                        if let Err(e) = port.write_all(&rtu_frame(unit, &resp)) {
                            log::error!("modbus rtu: write error {e}");
                        }
                    }
                }
            }
        }
    }
}

/// Result lines of the serial ASCII protocol: `<tag>,<OK|NG|ERR>,<score>,<ms>\r\n`.
pub struct SerialSink(pub Arc<Mutex<File>>);

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
        if let Ok(mut f) = self.0.lock() {
            if let Err(e) = f.write_all(result_line(r).as_bytes()) {
                log::error!("serial: cannot write a result line: {e}");
            }
        }
    }
}

/// The serial command reader: `TRIG`, `STATUS?`, `PING`, `RESET`; lines end with CR, LF or CR LF;
/// at most 64 bytes (longer input is discarded to the next terminator and answered
/// `!ERR,LINE_TOO_LONG`).
pub fn serve_serial_commands(mut port: File, out: Arc<Mutex<File>>, h: LineHandle) {
    let mut line: Vec<u8> = Vec::new();
    let mut too_long = false;
    let mut buf = [0u8; 128];
    let reply = |s: &str| {
        if let Ok(mut f) = out.lock() {
            let _ = f.write_all(format!("{s}\r\n").as_bytes());
        }
    };
    loop {
        let n = match port.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("serial: read error {e}; stopping the serial protocol");
                return;
            }
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                if too_long {
                    reply("!ERR,LINE_TOO_LONG");
                } else if !line.is_empty() {
                    match line.as_slice() {
                        b"TRIG" => h.trigger(),
                        b"PING" => reply("!PONG"),
                        b"RESET" => {
                            h.command(Command::ClearCounters);
                            reply("!OK");
                        }
                        b"STATUS?" => {
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
                        _ => reply("!ERR,UNKNOWN_COMMAND"),
                    }
                }
                line.clear();
                too_long = false;
            } else if line.len() >= 64 {
                too_long = true;
            } else {
                line.push(b);
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
    use crate::line::status::Outcome;

    #[test]
    fn result_lines_follow_the_protocol() {
        let r = ResultRecord {
            tag: 1042,
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
}
