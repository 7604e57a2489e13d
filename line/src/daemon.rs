//! `edge-ad run --config line.toml`: load model and bank, open the I/O, self-test, then inspect
//! every trigger until SIGTERM, which drains the parts in flight (each still gets its verdict).
//!
//! [`run`] reads as the steps: [`load`] (config, board, source, inspector), [`open_outputs`]
//! (sinks and ports; one that fails leaves the line Faulted, not a restart loop), the arbiter,
//! [`start_inputs`] (protocol servers, GPIO trigger, free-run), the self-test, and
//! [`supervise`] (signals, systemd, the watchdog) until the arbiter has drained.

use crate::arbiter::{self, LineHandle, LineTiming, Sink, Stage, StageResult};
use crate::config::{LineConfig, SourceKind, TriggerKind};
use crate::error::{LineError, Result};
use crate::products::Judge;
use crate::server::{self, PortRole, SerialPort, TcpLimits};
use crate::sinks::{JsonlSink, LogSink, QueuedSink};
use crate::status::{code, crc32, Counters, ErrCause, Health, LineState, Status};
use edge_ad::images::list_images;
use edge_ad::pipeline::{Device, PipelineOptions};
use edge_ad::preprocess::Rgb8;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The inspection stage of a folder or file source: the next image through the judge.
struct InspectStage {
    judge: Judge,
    frames: Vec<PathBuf>,
    next: usize,
}

impl Stage for InspectStage {
    fn inspect(&mut self, tag: u32, product: Option<usize>) -> StageResult {
        let p = &self.frames[self.next % self.frames.len()];
        self.next += 1;
        let img = Rgb8::open(p).map_err(|e| {
            log::warn!("tag {tag}: capture: {e}");
            ErrCause::Capture
        })?;
        self.judge.judge(tag, product, &img, p)
    }

    /// The first image scored to a finite number; the next trigger still gets the first image.
    fn self_test(&mut self, product: usize) -> Result<(), u16> {
        let saved = self.next;
        self.next = 0;
        let r = arbiter::self_test_outcome(self.inspect(0, Some(product)));
        self.next = saved;
        r
    }
}

/// What [`load`] prepares: the config, the stage and the status it starts with.
struct Loaded {
    cfg: LineConfig,
    cfg_bytes: Vec<u8>,
    board: Option<edge_ad_boards::Profile>,
    stage: Box<dyn Stage>,
    status: Status,
    /// The archive's result input, when `[archive]` keeps anything.
    archive_sink: Option<crate::archive::ArchiveSink>,
    /// How products are selected (`[products] select`; auto for a bank set).
    select: Option<crate::config::SelectKind>,
}

/// Config, board profile, source, model and banks: everything whose failure means nothing runs.
fn load(config_path: &Path, health: &Arc<Health>) -> Result<Loaded> {
    let (cfg, cfg_bytes) = LineConfig::load(config_path)?;
    let board = cfg.board_profile(config_path)?;
    let device: Device = cfg.model.device.parse().map_err(|e| LineError::Config {
        path: config_path.to_path_buf(),
        message: format!("model.device: {e}"),
    })?;
    let opts = PipelineOptions {
        model: cfg.model.model.clone(),
        onnx: cfg.model.onnx.clone(),
        projector: cfg.model.projector.clone(),
        threads: cfg.model.threads,
        fit: None,
        device,
    };
    let products = cfg.product_list();
    let (mut judge, infos) = Judge::load(&opts, &products, !cfg.product.is_empty())?;
    // A bank set as model.bank holds several products: recognised per frame unless
    // [products] says otherwise.
    let select = cfg
        .products
        .as_ref()
        .map(|p| p.select)
        .or((infos.len() > 1).then_some(crate::config::SelectKind::Auto));
    let bad = |message: String| LineError::Config {
        path: config_path.to_path_buf(),
        message,
    };
    if select == Some(crate::config::SelectKind::Auto) {
        if infos.len() < 2 {
            return Err(bad(format!(
                "products.select = \"auto\": {} holds one product; recognition needs at least 2",
                products[0].bank.display()
            )));
        }
        judge.enable_recognition(&infos)?;
    }
    let archive = cfg.archive.as_ref().and_then(|a| {
        let names = infos.iter().map(|p| (p.id, p.name.clone())).collect();
        crate::archive::start(a, health.clone(), names)
    });
    let (tap, archive_sink) = archive.unzip();
    judge.set_archive(tap);
    let active = match cfg.products.as_ref().and_then(|p| p.initial) {
        Some(id) => infos.iter().position(|p| p.id == id).ok_or_else(|| {
            bad(format!(
                "products.initial: {id} is not the id of a product (ids {})",
                infos
                    .iter()
                    .map(|p| p.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?,
        None => 0,
    };
    let stage: Box<dyn Stage> = match cfg.source.kind {
        SourceKind::V4l2 => {
            let s = &cfg.source;
            let cam = crate::camera::CameraConfig {
                path: s.path.clone(),
                format: s.format.unwrap_or(crate::pixels::PixelFormat::Yuyv),
                size: (s.width.unwrap_or_default(), s.height.unwrap_or_default()),
                fps: s.fps.unwrap_or(30),
                controls: s
                    .controls
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_i64()))
                    .collect(),
            };
            Box::new(crate::camera::CameraStage::start(cam, judge))
        }
        SourceKind::Folder | SourceKind::File => {
            let frames = match cfg.source.kind {
                SourceKind::Folder => list_images(&cfg.source.path)?,
                _ => vec![cfg.source.path.clone()],
            };
            if frames.is_empty() {
                return Err(LineError::NoImages {
                    path: cfg.source.path.clone(),
                });
            }
            Box::new(InspectStage {
                judge,
                frames,
                next: 0,
            })
        }
    };
    let status = Status {
        state: LineState::SelfTest,
        config_crc: crc32(&cfg_bytes),
        products: Arc::from(infos),
        active,
        high_word_first: cfg
            .modbus_tcp
            .as_ref()
            .is_none_or(|t| t.word_order == "high_first"),
        ..Default::default()
    };
    Ok(Loaded {
        cfg,
        cfg_bytes,
        board,
        stage,
        status,
        archive_sink,
        select,
    })
}

/// The outputs and ports [`open_outputs`] opened.
struct Outputs {
    sinks: Vec<Box<dyn Sink>>,
    serial: Option<(Arc<SerialPort>, Option<File>)>,
    rtu: Option<(Arc<SerialPort>, Option<File>)>,
    gpio_trigger: Option<(String, u32, Duration)>,
    /// The product code inputs (`products.select = "gpio"`).
    product_input: Option<arbiter::ProductInput>,
    /// The first output that failed to open: the line starts Faulted with this code.
    io_error: Option<u16>,
}

/// Open every output (journal, results log, serial, RTU, GPIO). An output that fails to open
/// leaves the line Faulted (READY low) with the reason logged and on the error register, instead
/// of a restart loop; a config that cannot be right (pins that do not resolve) is an error.
fn open_outputs(l: &mut Loaded, health: &Arc<Health>) -> Result<Outputs> {
    let mut io_error: Option<u16> = None;
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(QueuedSink::spawn(
        "log",
        Box::new(LogSink),
        health.clone(),
    ))];
    // The archive has its own queue and thread (the sink only hands results over).
    if let Some(a) = l.archive_sink.take() {
        sinks.push(Box::new(a));
    }
    let l = &*l;
    let cfg = &l.cfg;
    if let Some(p) = &cfg.log.results {
        let max = cfg.log.results_max_mb.saturating_mul(1 << 20);
        let sink =
            JsonlSink::open(p, max, cfg.log.results_keep, health.clone()).map_err(|source| {
                LineError::Open {
                    field: "log.results",
                    path: p.clone(),
                    source,
                }
            })?;
        sinks.push(Box::new(QueuedSink::spawn(
            "results",
            Box::new(sink),
            health.clone(),
        )));
    }
    // A port missing at start is reopened with backoff like one that vanishes later: the line
    // is Faulted (0x0501, PORT_LOST) until it is there and FAULT_ACK passes a self-test.
    let open_port = |field: &str, path: &Path, baud: u32, role: PortRole| match SerialPort::open(
        path, baud, role,
    ) {
        Ok((port, reader)) => (port, Some(reader)),
        Err(e) => {
            log::error!("{field} {}: {e}; retrying", path.display());
            (SerialPort::missing(path, baud, role, health), None)
        }
    };
    let serial = cfg.serial.as_ref().map(|s| {
        let (port, reader) = open_port("serial.port", &s.port, s.baud, PortRole::Serial);
        sinks.push(Box::new(QueuedSink::spawn(
            "serial",
            Box::new(server::SerialSink(port.clone(), health.clone())),
            health.clone(),
        )));
        (port, reader)
    });
    let rtu = cfg
        .modbus_rtu
        .as_ref()
        .map(|r| open_port("modbus_rtu.port", &r.port, r.baud, PortRole::Rtu));
    let mut gpio_trigger = None;
    let mut product_input = None;
    if let (Some(g), Some(b)) = (&cfg.gpio, &l.board) {
        if let Err(errors) = crate::pinmux::verify(cfg, &l.cfg_bytes, b, &g.pinmux_report) {
            for e in errors {
                log::error!("{e}");
            }
            io_error = io_error.or(Some(code::PINMUX));
        }
    }
    if let Some(g) = &cfg.gpio {
        use crate::gpio::{resolve_pin, GpioSink, GpiocdevOut, OutputTiming};
        let mut outs = Vec::new();
        for (line, spec) in g.outputs() {
            let (chip, off) =
                resolve_pin(spec, l.board.as_ref()).map_err(|source| LineError::Gpio {
                    line: format!("{line:?}"),
                    source,
                })?;
            outs.push((line, chip, off));
        }
        if !outs.is_empty() {
            match GpiocdevOut::open(&outs) {
                Ok(out) => sinks.push(Box::new(GpioSink::start(
                    OutputTiming {
                        strobe_ms: g.strobe_ms,
                        reject: g.reject.as_ref().map(|_| (g.reject_delay_ms, g.reject_ms)),
                    },
                    Box::new(out),
                ))),
                Err(e) => {
                    log::error!("gpio outputs: {e}");
                    io_error = io_error.or(Some(code::GPIO));
                }
            }
        }
        if let Some(p) = cfg
            .products
            .as_ref()
            .filter(|p| p.select == crate::config::SelectKind::Gpio)
        {
            let mut pins = Vec::new();
            for (i, spec) in p.gpio_lines.iter().enumerate() {
                pins.push(resolve_pin(spec, l.board.as_ref()).map_err(|source| {
                    LineError::Gpio {
                        line: format!("products.gpio_lines[{i}]"),
                        source,
                    }
                })?);
            }
            match crate::gpio::product_input(&pins) {
                Ok(input) => product_input = Some(input),
                Err(e) => {
                    log::error!("products.gpio_lines: {e}");
                    io_error = io_error.or(Some(code::GPIO));
                }
            }
        }
        if let Some(spec) = &g.trigger {
            let (chip, off) =
                resolve_pin(spec, l.board.as_ref()).map_err(|source| LineError::Gpio {
                    line: "trigger".into(),
                    source,
                })?;
            gpio_trigger = Some((chip, off, Duration::from_millis(g.debounce_ms)));
        }
    }
    Ok(Outputs {
        sinks,
        product_input,
        serial,
        rtu,
        gpio_trigger,
        io_error,
    })
}

/// Start what brings triggers and commands in: the protocol servers, the GPIO trigger input
/// and the free-run generator. Returns an I/O error code when an input failed to start.
fn start_inputs(
    cfg: &LineConfig,
    tcp: Option<std::net::TcpListener>,
    serial: Option<(Arc<SerialPort>, Option<File>)>,
    rtu: Option<(Arc<SerialPort>, Option<File>)>,
    gpio_trigger: Option<(String, u32, Duration)>,
    handle: &LineHandle,
) -> Option<u16> {
    if let (Some(listener), Some(t)) = (tcp, &cfg.modbus_tcp) {
        let h = handle.clone();
        let (unit, hwf) = (t.unit_id, t.word_order == "high_first");
        let limits = TcpLimits {
            max_connections: t.max_connections as usize,
            idle_timeout: Duration::from_secs(t.idle_timeout_s),
        };
        std::thread::spawn(move || server::serve_tcp(listener, h, unit, hwf, limits));
    }
    if let (Some((port, reader)), Some(r)) = (rtu, &cfg.modbus_rtu) {
        let h = handle.clone();
        let (unit, hwf) = (r.unit_id, r.word_order == "high_first");
        std::thread::spawn(move || server::serve_rtu(port, reader, h, unit, hwf));
    }
    if let Some((port, reader)) = serial {
        let h = handle.clone();
        std::thread::spawn(move || server::serve_serial_commands(port, reader, h));
    }
    let mut io_error = None;
    if let Some((chip, off, debounce)) = gpio_trigger {
        if let Err(e) = crate::gpio::watch_trigger(&chip, off, debounce, handle.clone()) {
            log::error!("{e}");
            io_error = Some(code::GPIO);
        }
    }
    if cfg.trigger.kind == TriggerKind::FreeRun {
        let rate = cfg.trigger.rate_hz.unwrap_or(1.0);
        let count = cfg.trigger.count;
        let h = handle.clone();
        std::thread::spawn(move || free_run(h, rate, count));
    }
    io_error
}

/// Run the line until SIGTERM/SIGINT or, in free-run with `trigger.count`, until that many
/// triggers are resolved. Returns the final counters.
pub fn run(config_path: &Path) -> Result<Counters> {
    let health = Arc::new(Health::default());
    let mut loaded = load(config_path, &health)?;
    let outputs = open_outputs(&mut loaded, &health)?;
    let tcp = match &loaded.cfg.modbus_tcp {
        None => None,
        Some(t) => {
            Some(
                std::net::TcpListener::bind(&t.bind).map_err(|source| LineError::Bind {
                    bind: t.bind.clone(),
                    source,
                })?,
            )
        }
    };
    let Loaded {
        cfg,
        stage,
        status,
        select,
        ..
    } = loaded;
    let timing = LineTiming {
        deadline: Duration::from_millis(cfg.timing.deadline_ms),
        fifo: cfg.timing.fifo,
        auto_online: cfg.timing.auto_online,
        fault_after: cfg.timing.fault_after,
        select,
    };
    let (handle, join) = arbiter::start_with_health(
        timing,
        stage,
        outputs.sinks,
        status,
        health.clone(),
        outputs.product_input,
    );
    let input_error = start_inputs(
        &cfg,
        tcp,
        outputs.serial,
        outputs.rtu,
        outputs.gpio_trigger,
        &handle,
    );
    // Ports missing at start (their servers reopen them): Faulted with 0x0501 from the start.
    if health.ports_lost.load(Ordering::SeqCst) != 0 {
        handle.port_lost(Some(code::SERIAL_OPEN));
    }
    // Self-test (line-side.md §6.2): I/O first, then the stage scores a source frame.
    match outputs.io_error.or(input_error) {
        Some(c) => handle.io_fault(c),
        None => handle.request_self_test(),
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    supervise(&cfg, &handle, join, &health)
}

/// The main thread until the arbiter has drained: SIGTERM starts the drain, systemd hears of
/// every state change, and the watchdog is fed only while inspection makes progress.
fn supervise(
    cfg: &LineConfig,
    handle: &LineHandle,
    join: std::thread::JoinHandle<Counters>,
    health: &Health,
) -> Result<Counters> {
    let notifier = crate::notify::Notifier::from_env();
    // systemd: up once the self-test has decided (Running, Ready or Faulted: READY on the wire
    // says which), with the outputs safe. A Faulted line is still "up", so that a missing camera
    // does not become a restart loop. The self-test is bounded (a camera waits 5 s for a frame);
    // the wait is bounded too, and SIGTERM ends it.
    let t0 = Instant::now();
    while matches!(
        handle.status().state,
        LineState::Booting | LineState::SelfTest
    ) && t0.elapsed() < Duration::from_secs(60)
        && !STOP.load(Ordering::SeqCst)
        && !join.is_finished()
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    notifier.send("READY=1");
    let mut watchdog = notifier.watchdog().map(|w| StageWatchdog::new(w / 2));
    let mut last_state = None;
    let every = Duration::from_secs(cfg.log.counters_every_s);
    let mut last_log = Instant::now();
    let mut stopping = false;
    while !join.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        if STOP.load(Ordering::SeqCst) && !stopping {
            log::info!("signal: draining the parts in flight");
            handle.shutdown();
            notifier.send("STOPPING=1");
            stopping = true;
        }
        let st = handle.status();
        if last_state != Some(st.state) {
            last_state = Some(st.state);
            notifier.send(&format!(
                "STATUS={} (error 0x{:04x})",
                server::state_word(st.state),
                st.error_code
            ));
        }
        if let Some(w) = watchdog.as_mut() {
            if w.due(health, st.alive) {
                notifier.send("WATCHDOG=1");
            }
        }
        if !every.is_zero() && last_log.elapsed() >= every {
            last_log = Instant::now();
            log::info!(
                "counters {:?} state {}",
                st.counters,
                server::state_word(st.state)
            );
        }
    }
    join.join().map_err(|_| LineError::ArbiterPanicked)
}

/// When to feed systemd's watchdog: every `period`, and only when the inspection stage made
/// progress since the last feed (finished a part or a self-test) or has nothing to do, and the
/// arbiter loop moved. A stage stuck in one frame — a hung driver, a dead GPU — starves it and
/// systemd restarts the process, with every part rejected meanwhile by its deadline.
#[derive(Debug)]
pub struct StageWatchdog {
    period: Duration,
    last_feed: Instant,
    last_done: u64,
    last_alive: u64,
}

impl StageWatchdog {
    /// A watchdog fed at most every `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last_feed: Instant::now(),
            last_done: 0,
            last_alive: u64::MAX,
        }
    }

    /// True when a `WATCHDOG=1` is due now (and counts it as sent).
    pub fn due(&mut self, health: &Health, alive: u64) -> bool {
        if self.last_feed.elapsed() < self.period {
            return false;
        }
        let done = health.stage_done.load(Ordering::SeqCst);
        let idle = !health.stage_busy.load(Ordering::SeqCst);
        if alive == self.last_alive || (done == self.last_done && !idle) {
            return false;
        }
        self.last_feed = Instant::now();
        self.last_done = done;
        self.last_alive = alive;
        true
    }
}

fn free_run(h: LineHandle, rate: f64, count: Option<u64>) {
    let period = Duration::from_secs_f64(1.0 / rate);
    // Wait for the self-test so that a bounded run inspects every part it counts.
    let t = Instant::now();
    while h.status().state == LineState::SelfTest && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut next = Instant::now();
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) && !STOP.load(Ordering::SeqCst) {
        h.trigger();
        n += 1;
        next += period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    if count.is_some() {
        h.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// M1: the watchdog used to be fed by the arbiter's own timer; a stage stuck in one frame
    /// now starves it, while an idle line or a working one feeds it.
    #[test]
    fn the_watchdog_is_fed_only_by_stage_progress() {
        let h = Health::default();
        let mut w = StageWatchdog::new(Duration::ZERO);
        assert!(w.due(&h, 1), "idle stage, arbiter alive");
        assert!(!w.due(&h, 1), "arbiter did not move");
        h.stage_busy.store(true, Ordering::SeqCst);
        assert!(!w.due(&h, 2), "busy in the same job since the last feed");
        assert!(!w.due(&h, 3));
        h.stage_done.fetch_add(1, Ordering::SeqCst);
        assert!(w.due(&h, 4), "finished a job");
        assert!(!w.due(&h, 5), "busy again, nothing finished");
    }
}
