//! The line's observable state: fail-safe state, error code, counters, the last results; and its
//! Modbus register image (line-side.md §5.3). The arbiter owns a [`Status`]; servers read
//! [`Registers`] snapshots of it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Fail-safe states (line-side.md §6.1); the number is register STATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineState {
    /// Process starting.
    Booting = 0,
    /// Checking model, bank, source and outputs.
    SelfTest = 1,
    /// Ready but offline: triggers are rejected.
    Ready = 2,
    /// Inspecting.
    Running = 3,
    /// A fault: every trigger is rejected until it clears.
    Faulted = 4,
    /// Shutting down: parts in flight finish, new triggers are rejected.
    Draining = 5,
}

impl LineState {
    /// READY output / status bit: only in Ready and Running.
    pub fn ready(self) -> bool {
        matches!(self, LineState::Ready | LineState::Running)
    }
}

/// Outcome of one tag. ERR = "cannot tell": rejected like NG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Outcome {
    /// Good part.
    #[serde(rename = "OK")]
    Ok = 1,
    /// Anomalous part.
    #[serde(rename = "NG")]
    Ng = 2,
    /// No valid verdict in time (deadline, capture or inference error, overrun, not running).
    #[serde(rename = "ERR")]
    Err = 3,
}

impl Outcome {
    /// The protocol word.
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Ng => "NG",
            Outcome::Err => "ERR",
        }
    }
}

/// Why a tag is ERR, and the error register's code (line-side.md §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrCause {
    /// No verdict by the deadline (0x0601).
    Deadline = 0x0601,
    /// FIFO full at the trigger (0x0602).
    Overrun = 0x0602,
    /// The frame could not be captured or read (0x0203).
    Capture = 0x0203,
    /// Inference failed or gave a non-finite score (0x0403).
    Inference = 0x0403,
    /// The line was not Running (offline, faulted, draining).
    NotRunning = 0x0001,
    /// The product code read at the trigger (GPIO) is no configured product (0x0701).
    UnknownProduct = 0x0701,
    /// The product code inputs could not be read at the trigger (0x0702).
    ProductInput = 0x0702,
    /// `select = "auto"`: the frame is close to no configured product (0x0703).
    Unrecognised = 0x0703,
}

/// Error codes that are not a tag's cause (ERROR_CODE register, docs/line.md).
pub mod code {
    /// No camera at the configured node (self-test).
    pub const CAMERA_NOT_FOUND: u16 = 0x0201;
    /// GPIO chip or line unusable.
    pub const GPIO: u16 = 0x0301;
    /// A header pin is not muxed as GPIO (pinmux report).
    pub const PINMUX: u16 = 0x0303;
    /// The self-test frame did not score to a finite number.
    pub const SELF_TEST: u16 = 0x0402;
    /// A serial or RTU port could not be opened at start.
    pub const SERIAL_OPEN: u16 = 0x0501;
    /// A serial or RTU port vanished while running (being reopened).
    pub const SERIAL_LOST: u16 = 0x0502;
}

/// Health figures that threads other than the arbiter update (output sinks, protocol servers,
/// the stage worker) and that the register image shows. Shared lock-free: none of them may wait
/// for the arbiter, and the arbiter never waits for them.
#[derive(Debug, Default)]
pub struct Health {
    /// Result lines or state changes an output could not take (queue full, write timed out).
    pub outputs_dropped: AtomicU32,
    /// Failed writes of the results log.
    pub log_errors: AtomicU32,
    /// The last results-log write failed (cleared by the next good one).
    pub log_failing: AtomicBool,
    /// Bit per serial port (0 serial, 1 RTU) that is gone and being reopened.
    pub ports_lost: AtomicU32,
    /// Modbus TCP connections open now.
    pub tcp_connections: AtomicU32,
    /// Modbus TCP connections closed by the server (cap reached: oldest idle first; idle timeout).
    pub tcp_dropped: AtomicU32,
    /// Jobs the inspection stage has finished (parts and self-tests): the watchdog's progress.
    pub stage_done: AtomicU64,
    /// The stage is working on a job now.
    pub stage_busy: AtomicBool,
    /// Archive entries dropped (queue full: a slow disk) or not written.
    pub archive_dropped: AtomicU32,
    /// The last tag the arbiter resolved and emitted (tags are emitted in order): the stage
    /// skips jobs at or before it.
    pub resolved_through: AtomicU32,
}

/// One resolved tag: what every sink receives, in tag order.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ResultRecord {
    /// The part's tag (1, 2, …; wraps to 1).
    pub tag: u32,
    /// OK / NG / ERR.
    pub outcome: Outcome,
    /// Image score (NaN for ERR).
    pub score: f32,
    /// Trigger → resolution, milliseconds.
    pub ms: u32,
    /// Why ERR.
    pub cause: Option<ErrCause>,
    /// Id of the product the part was inspected as (the one in effect at its trigger; 0 when
    /// none was: an unknown GPIO product code).
    pub product: u16,
}

/// A configured product as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProductInfo {
    /// PRODUCT_SELECT id (1–999).
    pub id: u16,
    /// Its name.
    pub name: String,
    /// CRC-32 of its bank file (BANK_CRC32 while it is active).
    pub bank_crc: u32,
}

/// Counters since start or the last CLEAR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Tags created.
    pub triggers: u32,
    /// OK verdicts.
    pub ok: u32,
    /// NG verdicts.
    pub ng: u32,
    /// ERR verdicts.
    pub faults: u32,
    /// Triggers with the FIFO full.
    pub overruns: u32,
    /// Verdicts that arrived after their tag was resolved ERR (dropped).
    pub late_results: u32,
    /// Processing time statistics (ms) over resolved tags.
    pub proc_min_ms: u32,
    /// Largest processing time.
    pub proc_max_ms: u32,
    /// Sum of processing times (for the mean).
    pub proc_sum_ms: u64,
}

/// Coils (line-side.md §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coil {
    /// Write 1: software trigger.
    Trigger = 0,
    /// Online (Running) or offline (Ready).
    Online = 1,
    /// Write 1: clear counters.
    ClearCounters = 2,
    /// Write 1: acknowledge a fault.
    FaultAck = 3,
}

impl Coil {
    /// The coil at a protocol address.
    pub fn from_address(a: u16) -> Option<Self> {
        match a {
            0 => Some(Coil::Trigger),
            1 => Some(Coil::Online),
            2 => Some(Coil::ClearCounters),
            3 => Some(Coil::FaultAck),
            _ => None,
        }
    }
}

/// Everything the registers show; owned by the arbiter.
#[derive(Debug, Clone)]
pub struct Status {
    /// Fail-safe state.
    pub state: LineState,
    /// Most severe active error (0 = none).
    pub error_code: u16,
    /// Counters.
    pub counters: Counters,
    /// Results, newest first (at most 8).
    pub ring: VecDeque<ResultRecord>,
    /// +1 per resolved tag.
    pub result_seq: u16,
    /// Tags in flight.
    pub in_flight: u16,
    /// Overrun latched until FAULT_ACK.
    pub overrun_latched: bool,
    /// Toggles every 500 ms while the process is alive.
    pub heartbeat: bool,
    /// +1 per second.
    pub heartbeat_count: u16,
    /// Seconds since start.
    pub uptime_s: u32,
    /// CRC-32 of the config file bytes.
    pub config_crc: u32,
    /// The configured products (at least one), in config order.
    pub products: std::sync::Arc<[ProductInfo]>,
    /// Index in `products` of the active product.
    pub active: usize,
    /// High word first (default) or low word first for 32-bit values.
    pub high_word_first: bool,
    /// GPIO ABI in use (0 = none).
    pub gpio_abi: u16,
    /// Arbiter loop iterations.
    pub alive: u64,
    /// Outputs dropped (a sink that cannot keep up), from [`Health`].
    pub outputs_dropped: u32,
    /// Results-log write errors, from [`Health`].
    pub log_errors: u32,
    /// The last results-log write failed.
    pub log_failing: bool,
    /// A serial/RTU port is gone (being reopened).
    pub port_lost: bool,
    /// Modbus TCP connections open.
    pub tcp_connections: u16,
    /// Modbus TCP connections the server closed.
    pub tcp_dropped: u32,
    /// Archive entries dropped, from [`Health`].
    pub archive_dropped: u32,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: LineState::Booting,
            error_code: 0,
            counters: Counters::default(),
            ring: VecDeque::new(),
            result_seq: 0,
            in_flight: 0,
            overrun_latched: false,
            heartbeat: false,
            heartbeat_count: 0,
            uptime_s: 0,
            config_crc: 0,
            products: std::sync::Arc::from(vec![ProductInfo {
                id: 1,
                name: "default".into(),
                bank_crc: 0,
            }]),
            active: 0,
            high_word_first: true,
            gpio_abi: 0,
            alive: 0,
            outputs_dropped: 0,
            log_errors: 0,
            log_failing: false,
            port_lost: false,
            tcp_connections: 0,
            tcp_dropped: 0,
            archive_dropped: 0,
        }
    }
}

impl Status {
    /// Copy the figures other threads keep in `h` into this snapshot.
    pub fn with_health(mut self, h: &Health) -> Self {
        self.outputs_dropped = h.outputs_dropped.load(Ordering::Relaxed);
        self.log_errors = h.log_errors.load(Ordering::Relaxed);
        self.log_failing = h.log_failing.load(Ordering::Relaxed);
        self.port_lost = h.ports_lost.load(Ordering::Relaxed) != 0;
        self.tcp_connections = h.tcp_connections.load(Ordering::Relaxed).min(65535) as u16;
        self.tcp_dropped = h.tcp_dropped.load(Ordering::Relaxed);
        self.archive_dropped = h.archive_dropped.load(Ordering::Relaxed);
        self
    }

    /// Count a resolved tag and keep it in the ring.
    pub fn record(&mut self, r: &ResultRecord) {
        let c = &mut self.counters;
        match r.outcome {
            Outcome::Ok => c.ok = c.ok.wrapping_add(1),
            Outcome::Ng => c.ng = c.ng.wrapping_add(1),
            Outcome::Err => c.faults = c.faults.wrapping_add(1),
        }
        let resolved = c.ok as u64 + c.ng as u64 + c.faults as u64;
        c.proc_min_ms = if resolved == 1 {
            r.ms
        } else {
            c.proc_min_ms.min(r.ms)
        };
        c.proc_max_ms = c.proc_max_ms.max(r.ms);
        c.proc_sum_ms += r.ms as u64;
        self.result_seq = self.result_seq.wrapping_add(1);
        self.ring.push_front(*r);
        self.ring.truncate(8);
    }

    /// The active product.
    pub fn active_product(&self) -> &ProductInfo {
        &self.products[self.active.min(self.products.len() - 1)]
    }

    /// The index of the product with this id.
    pub fn product_index(&self, id: u16) -> Option<usize> {
        self.products.iter().position(|p| p.id == id)
    }

    /// The register image of this status.
    pub fn registers(&self) -> Registers {
        let mut w = [0u16; 240];
        let last = self.ring.front();
        let mut status = 0u16;
        let bits = [
            self.state.ready(),
            self.state == LineState::Running,
            self.state == LineState::Faulted,
            self.in_flight > 0,
            self.heartbeat,
            self.overrun_latched,
            self.state == LineState::Draining,
            last.is_some_and(|r| r.outcome == Outcome::Ok),
            last.is_some_and(|r| r.outcome == Outcome::Ng),
            last.is_some_and(|r| r.outcome == Outcome::Err),
            self.port_lost,
            self.log_failing,
            self.outputs_dropped > 0,
        ];
        for (i, b) in bits.iter().enumerate() {
            if *b {
                status |= 1 << i;
            }
        }
        let put32 = |w: &mut [u16; 240], a: usize, v: u32| {
            let (hi, lo) = ((v >> 16) as u16, v as u16);
            if self.high_word_first {
                w[a] = hi;
                w[a + 1] = lo;
            } else {
                w[a] = lo;
                w[a + 1] = hi;
            }
        };
        let score1000 = |r: &ResultRecord| {
            if r.outcome == Outcome::Err || !r.score.is_finite() {
                65535
            } else {
                (r.score as f64 * 1000.0).round().clamp(0.0, 65534.0) as u16
            }
        };
        w[0] = status;
        w[1] = self.state as u16;
        w[2] = self.error_code;
        w[3] = self.result_seq;
        if let Some(r) = last {
            put32(&mut w, 4, r.tag);
            w[6] = r.outcome as u16;
            w[7] = score1000(r);
            w[8] = r.ms.min(65535) as u16;
            w[9] = r.product;
        }
        let c = &self.counters;
        put32(&mut w, 10, c.triggers);
        put32(&mut w, 12, c.ok);
        put32(&mut w, 14, c.ng);
        put32(&mut w, 16, c.faults);
        put32(&mut w, 18, c.overruns);
        let resolved = c.ok as u64 + c.ng as u64 + c.faults as u64;
        w[20] = c.proc_min_ms.min(65535) as u16;
        w[21] = c.proc_max_ms.min(65535) as u16;
        w[22] = c.proc_sum_ms.checked_div(resolved).unwrap_or(0).min(65535) as u16;
        w[23] = self.in_flight;
        put32(&mut w, 24, self.config_crc);
        put32(&mut w, 26, self.active_product().bank_crc);
        w[28] = 0;
        w[29] = self.heartbeat_count;
        put32(&mut w, 30, self.uptime_s);
        w[32] = self.gpio_abi;
        w[33] = self.active_product().id;
        put32(&mut w, 34, self.outputs_dropped);
        put32(&mut w, 36, self.log_errors);
        w[38] = self.tcp_connections;
        w[39] = self.products.len().min(65535) as u16;
        put32(&mut w, 40, self.tcp_dropped);
        put32(&mut w, 42, self.archive_dropped);
        for (i, r) in self.ring.iter().enumerate() {
            let a = 200 + 5 * i;
            put32(&mut w, a, r.tag);
            w[a + 2] = r.outcome as u16;
            w[a + 3] = score1000(r);
            w[a + 4] = r.ms.min(65535) as u16;
        }
        Registers {
            words: w,
            online: self.state == LineState::Running,
            active_product: self.active_product().id,
        }
    }
}

/// A snapshot of the register map.
#[derive(Debug, Clone)]
pub struct Registers {
    words: [u16; 240],
    online: bool,
    active_product: u16,
}

impl Registers {
    /// Register `addr` (input registers; `holding` also serves COMMAND, 100, which reads 0, and
    /// PRODUCT_SELECT, 101, which reads the active product's id). `None` = illegal address.
    pub fn register(&self, addr: usize, holding: bool) -> Option<u16> {
        match addr {
            0..=99 | 200..=239 => Some(self.words[addr]),
            100 if holding => Some(0),
            101 if holding => Some(self.active_product),
            _ => None,
        }
    }
    /// Holding registers a master may write: COMMAND (100) and PRODUCT_SELECT (101).
    pub fn writable(addr: u16) -> bool {
        addr == 100 || addr == 101
    }
    /// A value COMMAND accepts: 1 clear counters, 2 fault ack, 3 online, 4 offline.
    pub fn command_value(value: u16) -> bool {
        (1..=4).contains(&value)
    }
    /// Coil `addr`: TRIGGER, CLEAR and FAULT_ACK read 0 (self-clearing); ONLINE the state.
    pub fn coil(&self, addr: usize) -> Option<bool> {
        match addr {
            0 | 2 | 3 => Some(false),
            1 => Some(self.online),
            _ => None,
        }
    }
    /// Discrete input `addr`: 0 READY, 1 ONLINE, 2 FAULTED, 3 BUSY, 4 HEARTBEAT, 5 LAST_OK,
    /// 6 OVERRUN.
    pub fn discrete(&self, addr: usize) -> Option<bool> {
        let s = self.words[0];
        let bit = |b: u16| s & (1 << b) != 0;
        Some(match addr {
            0 => bit(0),
            1 => bit(1),
            2 => bit(2),
            3 => bit(3),
            4 => bit(4),
            5 => bit(7),
            6 => bit(5),
            _ => return None,
        })
    }
}

/// CRC-32 (IEEE) of bytes, for CONFIG_CRC32 and BANK_CRC32.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn registers_follow_the_map_in_both_word_orders() {
        let mut s = Status {
            state: LineState::Running,
            ..Default::default()
        };
        s.counters.triggers = 0x0001_0002;
        s.record(&ResultRecord {
            tag: 70000,
            outcome: Outcome::Ng,
            score: 0.9126,
            ms: 48,
            cause: None,
            product: 7,
        });
        let r = s.registers();
        assert_eq!(r.register(1, false), Some(3));
        assert_eq!(r.register(0, false).unwrap() & 0b11, 0b11); // READY, ONLINE
        assert_eq!(r.register(0, false).unwrap() & (1 << 8), 1 << 8); // LAST_NG
        assert_eq!(
            (r.register(4, false), r.register(5, false)),
            (Some(1), Some(4464))
        );
        assert_eq!(r.register(6, false), Some(2));
        assert_eq!(r.register(7, false), Some(913));
        assert_eq!(r.register(8, false), Some(48));
        assert_eq!(
            (r.register(10, false), r.register(11, false)),
            (Some(1), Some(2))
        );
        assert_eq!(
            r.register(14, false).zip(r.register(15, false)),
            Some((0, 1))
        );
        assert_eq!(r.register(200, true), Some(1));
        assert_eq!(r.register(99, false), Some(0));
        assert_eq!(r.register(100, false), None);
        assert_eq!(r.register(100, true), Some(0));
        assert_eq!(r.register(9, false), Some(7)); // LAST_PRODUCT
        assert_eq!(r.register(33, false), Some(1)); // ACTIVE_PRODUCT
        assert_eq!(r.register(39, false), Some(1)); // PRODUCT_COUNT
        assert_eq!(r.register(101, true), Some(1)); // PRODUCT_SELECT reads the active id
        assert_eq!(r.register(101, false), None);
        assert!(Registers::writable(100) && Registers::writable(101) && !Registers::writable(102));
        assert_eq!(r.register(150, true), None);
        s.high_word_first = false;
        let r = s.registers();
        assert_eq!(
            (r.register(4, false), r.register(5, false)),
            (Some(4464), Some(1))
        );
        assert_eq!(r.discrete(0), Some(true));
        assert_eq!(r.coil(1), Some(true));
        assert_eq!(r.coil(9), None);
    }
}
