//! Digital outputs to the PLC (line-side.md §6.4): PASS, STROBE, READY, HEARTBEAT, FAULT and an
//! optional timed REJECT pulse. [`OutputPlan`] is the timing logic, pure and driven by a clock the
//! caller passes in (tests use a fake one); [`DigitalOut`] is the narrow seam to the hardware
//! (gpiocdev on a Jetson; a recorder in tests).
//!
//! - PASS is set (OK) or cleared (NG, ERR) at least 1 ms before STROBE rises and held while it is
//!   high; STROBE is high `strobe_ms`; the next result waits for STROBE to fall plus 5 ms.
//! - READY follows the state (high only in Ready and Running), FAULT is high in Faulted.
//! - HEARTBEAT toggles every 500 ms while the process is alive.
//! - REJECT (timed mode) pulses `reject_ms` at trigger + `reject_delay_ms` for NG and ERR parts.

use super::status::{LineState, Outcome, ResultRecord};
use std::collections::BTreeMap;

/// The output lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutLine {
    /// Energised for OK.
    Pass,
    /// Result valid.
    Strobe,
    /// Ready / running.
    Ready,
    /// Alive.
    Heartbeat,
    /// Faulted.
    Fault,
    /// Timed reject pulse.
    Reject,
}

impl OutLine {
    /// The line's name in configs and reports (`pass`, `strobe`, …).
    pub fn role(self) -> &'static str {
        match self {
            OutLine::Pass => "pass",
            OutLine::Strobe => "strobe",
            OutLine::Ready => "ready",
            OutLine::Heartbeat => "heartbeat",
            OutLine::Fault => "fault",
            OutLine::Reject => "reject",
        }
    }
}

/// The hardware seam.
pub trait DigitalOut: Send {
    /// Drive `line` active or inactive.
    fn set(&mut self, line: OutLine, active: bool) -> std::io::Result<()>;
}

/// Output timing settings.
#[derive(Debug, Clone, Copy)]
pub struct OutputTiming {
    /// STROBE pulse width (≥ 2 PLC scans).
    pub strobe_ms: u64,
    /// Timed reject: delay after the trigger and pulse width; `None` = no reject line.
    pub reject: Option<(u64, u64)>,
}

const MS: u64 = 1_000_000;
const PASS_SETUP: u64 = MS;
const STROBE_GAP: u64 = 5 * MS;
const HEARTBEAT: u64 = 500 * MS;

/// The output schedule: what to drive when, in nanoseconds of the caller's monotonic clock.
#[derive(Debug)]
pub struct OutputPlan {
    timing: OutputTiming,
    /// (time, sequence) → (line, value); the sequence keeps same-time events in order.
    queue: BTreeMap<(u64, u64), (OutLine, bool)>,
    seq: u64,
    /// When the strobe channel is free again.
    free_at: u64,
    next_heartbeat: u64,
    heartbeat: bool,
}

impl OutputPlan {
    /// A plan starting at `now` with every output inactive (the safe state).
    pub fn new(timing: OutputTiming, now: u64) -> Self {
        Self {
            timing,
            queue: BTreeMap::new(),
            seq: 0,
            free_at: now,
            next_heartbeat: now + HEARTBEAT,
            heartbeat: false,
        }
    }

    fn at(&mut self, t: u64, line: OutLine, value: bool) {
        self.seq += 1;
        self.queue.insert((t, self.seq), (line, value));
    }

    /// A resolved tag at `now`.
    pub fn result(&mut self, now: u64, r: &ResultRecord) {
        let start = now.max(self.free_at);
        self.at(start, OutLine::Pass, r.outcome == Outcome::Ok);
        let rise = start + PASS_SETUP;
        let fall = rise + self.timing.strobe_ms * MS;
        self.at(rise, OutLine::Strobe, true);
        self.at(fall, OutLine::Strobe, false);
        // PASS returns to the safe state (reject) when the strobe falls.
        self.at(fall, OutLine::Pass, false);
        self.free_at = fall + STROBE_GAP;
        if let (Some((delay, width)), true) = (self.timing.reject, r.outcome != Outcome::Ok) {
            let t0 = now.saturating_sub(r.ms as u64 * MS);
            let on = (t0 + delay * MS).max(now);
            self.at(on, OutLine::Reject, true);
            self.at(on + width * MS, OutLine::Reject, false);
        }
    }

    /// The line state changed at `now`.
    pub fn state(&mut self, now: u64, s: LineState) {
        self.at(now, OutLine::Ready, s.ready());
        self.at(now, OutLine::Fault, s == LineState::Faulted);
    }

    /// When the next event is due.
    pub fn next_due(&self) -> u64 {
        self.queue
            .keys()
            .next()
            .map_or(self.next_heartbeat, |k| k.0.min(self.next_heartbeat))
    }

    /// Every event due at `now`, in order.
    pub fn due(&mut self, now: u64) -> Vec<(OutLine, bool)> {
        let mut out = Vec::new();
        while self.next_heartbeat <= now {
            self.heartbeat = !self.heartbeat;
            self.at(self.next_heartbeat, OutLine::Heartbeat, self.heartbeat);
            self.next_heartbeat += HEARTBEAT;
        }
        while let Some((&k, _)) = self.queue.iter().next() {
            if k.0 > now {
                break;
            }
            out.push(self.queue.remove(&k).expect("key exists"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    /// Kernel timestamps become Instants in the past by the event's age, from either clock.
    #[test]
    fn event_timestamps_map_to_instants() {
        use std::time::{Duration, Instant};
        for clock in [libc::CLOCK_MONOTONIC, libc::CLOCK_REALTIME] {
            let stamp = clock_ns(clock) - 30_000_000;
            let age = Instant::now() - event_instant(stamp);
            assert!(
                age >= Duration::from_millis(30) && age < Duration::from_millis(80),
                "{age:?}"
            );
        }
        // A stamp from the future or from another clock: now.
        for stamp in [clock_ns(libc::CLOCK_MONOTONIC) + 5_000_000_000, 12345] {
            assert!(Instant::now() - event_instant(stamp) < Duration::from_millis(20));
        }
    }

    use super::*;

    fn rec(tag: u32, outcome: Outcome, ms: u32) -> ResultRecord {
        ResultRecord {
            tag,
            product: 1,
            outcome,
            score: 0.5,
            ms,
            cause: None,
        }
    }

    /// Drive the plan with a fake clock in 1 ms steps, recording (ms, line, value).
    fn run(plan: &mut OutputPlan, until_ms: u64) -> Vec<(u64, OutLine, bool)> {
        let mut log = Vec::new();
        for t in 0..=until_ms {
            for (l, v) in plan.due(t * MS) {
                log.push((t, l, v));
            }
        }
        log
    }

    #[test]
    fn pass_leads_the_strobe_and_results_queue_behind_it() {
        let mut p = OutputPlan::new(
            OutputTiming {
                strobe_ms: 20,
                reject: None,
            },
            0,
        );
        p.result(0, &rec(1, Outcome::Ok, 40));
        // A second result 3 ms later waits for strobe fall (21 ms) + 5 ms.
        p.result(3 * MS, &rec(2, Outcome::Ng, 40));
        let log: Vec<_> = run(&mut p, 60)
            .into_iter()
            .filter(|e| e.1 != OutLine::Heartbeat)
            .collect();
        assert_eq!(
            log,
            vec![
                (0, OutLine::Pass, true),
                (1, OutLine::Strobe, true),
                (21, OutLine::Strobe, false),
                (21, OutLine::Pass, false),
                (26, OutLine::Pass, false),
                (27, OutLine::Strobe, true),
                (47, OutLine::Strobe, false),
                (47, OutLine::Pass, false),
            ]
        );
    }

    #[test]
    fn timed_reject_ready_fault_and_heartbeat() {
        let mut p = OutputPlan::new(
            OutputTiming {
                strobe_ms: 20,
                reject: Some((300, 50)),
            },
            0,
        );
        p.state(0, LineState::Running);
        // NG resolved 100 ms after its trigger at t = 0 → reject 300..350 ms.
        p.result(100 * MS, &rec(1, Outcome::Ng, 100));
        // OK parts never pulse the reject line.
        p.result(150 * MS, &rec(2, Outcome::Ok, 100));
        p.state(1200 * MS, LineState::Faulted);
        let log = run(&mut p, 1600);
        let of = |l: OutLine| -> Vec<(u64, bool)> {
            log.iter()
                .filter(|e| e.1 == l)
                .map(|e| (e.0, e.2))
                .collect()
        };
        assert_eq!(of(OutLine::Reject), vec![(300, true), (350, false)]);
        assert_eq!(of(OutLine::Ready), vec![(0, true), (1200, false)]);
        assert_eq!(of(OutLine::Fault), vec![(0, false), (1200, true)]);
        assert_eq!(
            of(OutLine::Heartbeat),
            vec![(500, true), (1000, false), (1500, true)]
        );
        // A reject whose moment has passed fires at once.
        let mut p = OutputPlan::new(
            OutputTiming {
                strobe_ms: 20,
                reject: Some((10, 50)),
            },
            0,
        );
        p.result(100 * MS, &rec(1, Outcome::Err, 100));
        let r: Vec<_> = run(&mut p, 200)
            .into_iter()
            .filter(|e| e.1 == OutLine::Reject)
            .collect();
        assert_eq!(
            r,
            vec![(100, OutLine::Reject, true), (150, OutLine::Reject, false)]
        );
    }
}

/// A pin in the config: a 40-pin header number (resolved through the board profile) or a line of
/// a chip named by its label.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum PinSpec {
    /// Header pin number.
    Header(u8),
    /// `{ chip = "tegra234-gpio", offset = 105 }`.
    Line {
        /// Chip label.
        chip: String,
        /// Line offset.
        offset: u32,
    },
}

/// Why a GPIO pin or line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    /// A header pin without a board profile to resolve it.
    #[error("header pin {0}: set `board` so that header pins can be resolved, or give {{ chip, offset }}")]
    NoBoard(u8),
    /// The board has no such GPIO header pin.
    #[error(transparent)]
    Board(#[from] edge_ad_boards::BoardError),
    /// The GPIO chips could not be listed.
    #[error("cannot list GPIO chips: {0}")]
    ListChips(String),
    /// No chip has the label.
    #[error("no GPIO chip labelled `{label}` (chips: {seen})")]
    NoChip {
        /// The label asked for.
        label: String,
        /// The labels present.
        seen: String,
    },
    /// The kernel refused the line request.
    #[error("{what} {chip} line {offset}: {message}")]
    Request {
        /// Which output or input.
        what: String,
        /// Chip label.
        chip: String,
        /// Line offset.
        offset: u32,
        /// gpiocdev's explanation.
        message: String,
    },
}

/// Chip label and offset of a pin.
pub fn resolve_pin(
    spec: &PinSpec,
    board: Option<&edge_ad_boards::Profile>,
) -> Result<(String, u32), GpioError> {
    match spec {
        PinSpec::Line { chip, offset } => Ok((chip.clone(), *offset)),
        PinSpec::Header(pin) => {
            let b = board.ok_or(GpioError::NoBoard(*pin))?;
            Ok(edge_ad_boards::header_pin(b, *pin).map(|(chip, l)| (chip, l.offset))?)
        }
    }
}

/// The `/dev/gpiochipN` whose label is `label` (chips are found by label: numbering changes).
pub fn chip_by_label(label: &str) -> Result<std::path::PathBuf, GpioError> {
    let chips = gpiocdev::chip::chips().map_err(|e| GpioError::ListChips(e.to_string()))?;
    let mut seen = Vec::new();
    for p in chips {
        if let Ok(info) = gpiocdev::Chip::from_path(&p).and_then(|c| c.info()) {
            if info.label == label {
                return Ok(p);
            }
            seen.push(info.label);
        }
    }
    Err(GpioError::NoChip {
        label: label.to_string(),
        seen: if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        },
    })
}

/// Outputs on GPIO character devices (gpiocdev; uAPI v2, v1 fallback), requested inactive so that
/// the PLC sees "reject, not ready" from the first instant.
pub struct GpiocdevOut {
    lines: Vec<(OutLine, gpiocdev::Request, u32)>,
}

impl GpiocdevOut {
    /// Request every configured output line.
    pub fn open(lines: &[(OutLine, String, u32)]) -> Result<Self, GpioError> {
        let mut out = Vec::new();
        for (line, chip, offset) in lines {
            let path = chip_by_label(chip)?;
            let req = gpiocdev::Request::builder()
                .on_chip(&path)
                .with_consumer("edge-ad")
                .with_line(*offset)
                .as_output(gpiocdev::line::Value::Inactive)
                .request()
                .map_err(|e| GpioError::Request {
                    what: format!("{line:?} output"),
                    chip: chip.clone(),
                    offset: *offset,
                    message: e.to_string(),
                })?;
            out.push((*line, req, *offset));
        }
        Ok(Self { lines: out })
    }
}

impl DigitalOut for GpiocdevOut {
    fn set(&mut self, line: OutLine, active: bool) -> std::io::Result<()> {
        for (l, req, off) in &self.lines {
            if *l == line {
                let v = if active {
                    gpiocdev::line::Value::Active
                } else {
                    gpiocdev::line::Value::Inactive
                };
                req.set_value(*off, v).map_err(std::io::Error::other)?;
            }
        }
        Ok(())
    }
}

/// Watch a trigger input (active low through the opto board, rising edge, kernel debounce) and
/// turn each edge into a trigger. Runs until the request fails.
pub fn watch_trigger(
    chip: &str,
    offset: u32,
    debounce: std::time::Duration,
    handle: super::arbiter::LineHandle,
) -> Result<(), GpioError> {
    let path = chip_by_label(chip)?;
    let req = gpiocdev::Request::builder()
        .on_chip(&path)
        .with_consumer("edge-ad")
        .with_line(offset)
        .as_input()
        .as_active_low()
        .with_edge_detection(gpiocdev::line::EdgeDetection::RisingEdge)
        .with_debounce_period(debounce)
        .request()
        .map_err(|e| GpioError::Request {
            what: "trigger input".into(),
            chip: chip.to_string(),
            offset,
            message: e.to_string(),
        })?;
    std::thread::Builder::new()
        .name("edge-ad-gpio-trigger".into())
        .spawn(move || loop {
            match req.wait_edge_event(std::time::Duration::from_millis(200)) {
                Ok(true) => match req.read_edge_event() {
                    Ok(ev) => handle.trigger_at(event_instant(ev.timestamp_ns)),
                    Err(e) => {
                        log::error!("gpio trigger: {e}");
                        return;
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    log::error!("gpio trigger: {e}");
                    return;
                }
            }
        })
        .map_err(|e| GpioError::Request {
            what: "trigger thread".into(),
            chip: chip.to_string(),
            offset,
            message: e.to_string(),
        })?;
    Ok(())
}

/// The product code inputs of `products.select = "gpio"`: `pins` (chip label, offset), least
/// significant bit first, active high, requested as inputs once; each call reads them all and
/// returns the code (the product id). Lines on several chips are one request per chip.
pub fn product_input(pins: &[(String, u32)]) -> Result<super::arbiter::ProductInput, GpioError> {
    let mut reqs: Vec<(gpiocdev::Request, Vec<(u32, usize)>)> = Vec::new();
    let mut chips: Vec<String> = Vec::new();
    for (chip, _) in pins {
        if !chips.contains(chip) {
            chips.push(chip.clone());
        }
    }
    for chip in chips {
        let path = chip_by_label(&chip)?;
        let lines: Vec<(u32, usize)> = pins
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| *c == chip)
            .map(|(bit, (_, off))| (*off, bit))
            .collect();
        let offsets: Vec<u32> = lines.iter().map(|l| l.0).collect();
        let req = gpiocdev::Request::builder()
            .on_chip(&path)
            .with_consumer("edge-ad-product")
            .with_lines(&offsets)
            .as_input()
            .request()
            .map_err(|e| GpioError::Request {
                what: "product code inputs".into(),
                chip: chip.clone(),
                offset: offsets[0],
                message: e.to_string(),
            })?;
        reqs.push((req, lines));
    }
    Ok(Box::new(move || {
        let mut code = 0u16;
        for (req, lines) in &reqs {
            for (off, bit) in lines {
                let v = req.value(*off).map_err(std::io::Error::other)?;
                if v == gpiocdev::line::Value::Active {
                    code |= 1 << bit;
                }
            }
        }
        Ok(code)
    }))
}

/// Nanoseconds of `clock` now.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The [`Instant`](std::time::Instant) of an edge event's kernel timestamp, so that a part's
/// deadline counts from the edge itself, not from when this thread got to read it. GPIO uAPI v2
/// stamps events with CLOCK_MONOTONIC (the clock `Instant` uses); uAPI v1 on kernels before 5.7
/// used CLOCK_REALTIME. A stamp from neither clock's last 10 s falls back to now.
pub fn event_instant(timestamp_ns: u64) -> std::time::Instant {
    let now = std::time::Instant::now();
    const WINDOW: u64 = 10_000_000_000;
    for clock in [libc::CLOCK_MONOTONIC, libc::CLOCK_REALTIME] {
        let age = clock_ns(clock).wrapping_sub(timestamp_ns);
        if age <= WINDOW {
            return now
                .checked_sub(std::time::Duration::from_nanos(age))
                .unwrap_or(now);
        }
    }
    now
}

enum OutMsg {
    Result(ResultRecord),
    State(LineState),
}

/// The arbiter's sink for digital outputs: hands results and states to an output thread that owns
/// the [`OutputPlan`] and the [`DigitalOut`] (so a slow GPIO write never blocks the arbiter).
pub struct GpioSink(std::sync::mpsc::Sender<OutMsg>);

impl GpioSink {
    /// Start the output thread.
    pub fn start(timing: OutputTiming, mut out: Box<dyn DigitalOut>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<OutMsg>();
        std::thread::Builder::new()
            .name("edge-ad-gpio-out".into())
            .spawn(move || {
                let start = std::time::Instant::now();
                let now = || start.elapsed().as_nanos() as u64;
                let mut plan = OutputPlan::new(timing, now());
                loop {
                    let wait = plan.next_due().saturating_sub(now());
                    match rx.recv_timeout(std::time::Duration::from_nanos(wait)) {
                        Ok(OutMsg::Result(r)) => plan.result(now(), &r),
                        Ok(OutMsg::State(s)) => plan.state(now(), s),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            // Process ending: everything to the safe state.
                            for l in [
                                OutLine::Pass,
                                OutLine::Strobe,
                                OutLine::Ready,
                                OutLine::Reject,
                            ] {
                                let _ = out.set(l, false);
                            }
                            return;
                        }
                    }
                    for (l, v) in plan.due(now()) {
                        if let Err(e) = out.set(l, v) {
                            log::error!("gpio output {l:?}: {e}");
                        }
                    }
                }
            })
            .expect("spawn the GPIO output thread");
        Self(tx)
    }
}

impl super::arbiter::Sink for GpioSink {
    fn emit(&mut self, r: &ResultRecord) {
        let _ = self.0.send(OutMsg::Result(*r));
    }
    fn state(&mut self, s: LineState) {
        let _ = self.0.send(OutMsg::State(s));
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;
    use crate::arbiter::Sink;
    use std::sync::{Arc, Mutex};

    struct Recorder(Arc<Mutex<Vec<(OutLine, bool)>>>);
    impl DigitalOut for Recorder {
        fn set(&mut self, line: OutLine, active: bool) -> std::io::Result<()> {
            self.0.lock().unwrap().push((line, active));
            Ok(())
        }
    }

    #[test]
    fn the_output_thread_drives_the_plan_and_releases_on_exit() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut sink = GpioSink::start(
            OutputTiming {
                strobe_ms: 5,
                reject: None,
            },
            Box::new(Recorder(log.clone())),
        );
        sink.state(LineState::Running);
        sink.emit(&ResultRecord {
            tag: 1,
            product: 1,
            outcome: Outcome::Ok,
            score: 0.1,
            ms: 10,
            cause: None,
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        let seen: Vec<_> = log
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|e| e.0 != OutLine::Heartbeat)
            .collect();
        assert_eq!(
            seen,
            vec![
                (OutLine::Ready, true),
                (OutLine::Fault, false),
                (OutLine::Pass, true),
                (OutLine::Strobe, true),
                (OutLine::Strobe, false),
                (OutLine::Pass, false),
            ]
        );
        drop(sink);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let end: Vec<_> = log.lock().unwrap().iter().rev().take(4).copied().collect();
        assert!(end.iter().all(|e| !e.1), "outputs released: {end:?}");
    }

    #[test]
    fn pins_resolve_through_the_board_or_by_label() {
        let nano = edge_ad_boards::profile("orin-nano").unwrap();
        assert_eq!(
            resolve_pin(&PinSpec::Header(29), Some(&nano)).unwrap(),
            ("tegra234-gpio".into(), 105)
        );
        let e = resolve_pin(&PinSpec::Header(29), None).unwrap_err();
        assert!(matches!(e, GpioError::NoBoard(29)), "{e}");
        assert!(e.to_string().contains("board"), "{e}");
        let e = resolve_pin(&PinSpec::Header(2), Some(&nano))
            .unwrap_err()
            .to_string();
        assert!(e.contains("header pin 2"), "{e}");
        assert_eq!(
            resolve_pin(
                &PinSpec::Line {
                    chip: "x".into(),
                    offset: 3
                },
                None
            )
            .unwrap(),
            ("x".into(), 3)
        );
        // On a machine without GPIO chips the error names the label asked for.
        if let Err(e) = chip_by_label("edge-ad-no-such-chip") {
            assert!(e.to_string().contains("edge-ad-no-such-chip"), "{e}");
        }
    }
}
