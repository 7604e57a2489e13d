//! `edge-ad run --config line.toml`: load model and bank, open the I/O, self-test, then inspect
//! every trigger until SIGTERM, which drains the parts in flight (each still gets its verdict).

use super::arbiter::{self, LineHandle, LineTiming, Sink, Stage, StageResult};
use super::config::{LineConfig, SourceKind, TriggerKind};
use super::server;
use super::status::{crc32, Counters, ErrCause, LineState, Outcome, ResultRecord, Status};
use crate::images::list_images;
use crate::inspector::{Inspector, Verdict};
use crate::pipeline::{Device, PipelineOptions};
use crate::preprocess::Rgb8;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The inspection stage of the daemon: the next frame of the source through the inspector.
struct InspectStage {
    inspector: Inspector,
    frames: Vec<PathBuf>,
    next: usize,
}

impl Stage for InspectStage {
    fn inspect(&mut self, tag: u32) -> StageResult {
        let p = &self.frames[self.next % self.frames.len()];
        self.next += 1;
        let img = Rgb8::open(p).map_err(|e| {
            log::warn!("tag {tag}: capture: {e}");
            ErrCause::Capture
        })?;
        let (insp, verdict) = self.inspector.inspect(&img, p).map_err(|e| {
            log::warn!("tag {tag}: inference: {e}");
            ErrCause::Inference
        })?;
        Ok((insp.score, verdict == Verdict::Ng))
    }
}

impl InspectStage {
    /// The self-test (line-side.md §6.2): the first source frame through the same path as a
    /// part, to a finite score; the first trigger then still gets the first frame.
    fn self_test(&mut self) -> Result<(), u16> {
        let r = self.inspect(0);
        self.next = 0;
        match r {
            Ok((score, _)) if score.is_finite() => Ok(()),
            Ok((score, _)) => {
                log::error!("self-test: score {score} is not finite");
                Err(0x0402)
            }
            Err(ErrCause::Capture) => Err(ErrCause::Capture as u16),
            Err(_) => Err(0x0402),
        }
    }
}

/// One JSON line per resolved tag.
struct JsonlSink(std::io::BufWriter<std::fs::File>);

impl Sink for JsonlSink {
    fn emit(&mut self, r: &ResultRecord) {
        let line = serde_json::json!({
            "tag": r.tag, "outcome": r.outcome, "score": if r.score.is_finite() { Some(r.score) } else { None },
            "ms": r.ms, "cause": r.cause,
        });
        let _ = writeln!(self.0, "{line}");
        let _ = self.0.flush();
    }
}

/// NG and ERR parts in the log.
struct LogSink;

impl Sink for LogSink {
    fn emit(&mut self, r: &ResultRecord) {
        match r.outcome {
            Outcome::Ok => log::debug!("tag {} OK {:.3} {} ms", r.tag, r.score, r.ms),
            Outcome::Ng => log::info!("tag {} NG {:.3} {} ms", r.tag, r.score, r.ms),
            Outcome::Err => log::warn!("tag {} ERR ({:?}) {} ms", r.tag, r.cause, r.ms),
        }
    }
    fn state(&mut self, s: LineState) {
        log::info!("line {}", server::state_word(s));
    }
}

/// Errors of starting the daemon (bad config, model, bank, source): nothing runs.
pub type StartError = String;

/// Run the line until SIGTERM/SIGINT or, in free-run with `trigger.count`, until that many
/// triggers are resolved. Returns the final counters.
pub fn run(config_path: &Path) -> Result<Counters, StartError> {
    let (cfg, cfg_bytes) = LineConfig::load(config_path)?;
    let board = cfg.board_profile(config_path)?;
    let frames = match cfg.source.kind {
        SourceKind::Folder => list_images(&cfg.source.path).map_err(|e| e.to_string())?,
        SourceKind::File => vec![cfg.source.path.clone()],
        SourceKind::V4l2 => Vec::new(),
    };
    let camera = (cfg.source.kind == SourceKind::V4l2).then(|| super::camera::CameraConfig {
        path: cfg.source.path.clone(),
        format: cfg
            .source
            .format
            .unwrap_or(super::pixels::PixelFormat::Yuyv),
        size: (
            cfg.source.width.unwrap_or_default(),
            cfg.source.height.unwrap_or_default(),
        ),
        fps: cfg.source.fps.unwrap_or(30),
        controls: cfg
            .source
            .controls
            .iter()
            .map(|(k, v)| (k.clone(), v.as_i64()))
            .collect(),
    });
    if frames.is_empty() && camera.is_none() {
        return Err(format!(
            "source.path {}: no image files",
            cfg.source.path.display()
        ));
    }
    let device: Device = cfg
        .model
        .device
        .parse()
        .map_err(|e| format!("{}: model.device: {e}", config_path.display()))?;
    let opts = PipelineOptions {
        model: cfg.model.model.clone(),
        onnx: cfg.model.onnx.clone(),
        projector: cfg.model.projector.clone(),
        threads: cfg.model.threads,
        fit: None,
        device,
    };
    let bank_bytes = std::fs::read(&cfg.model.bank)
        .map_err(|e| format!("model.bank {}: {e}", cfg.model.bank.display()))?;
    let inspector = Inspector::load(&opts, &cfg.model.bank).map_err(|e| e.to_string())?;

    // Self-test (line-side.md §6.2): the model scores the first source frame to a finite number.
    let stage: Box<dyn Stage>;
    let self_test;
    if let Some(cam) = camera {
        let st = super::camera::CameraStage::start(cam, inspector);
        // Give the camera time to start streaming, then the same check on a live frame.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut frame = st.next_frame();
        while frame.is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            frame = st.next_frame();
        }
        self_test = match frame {
            Ok(_) => Ok(()),
            Err(e) => {
                log::error!("self-test: camera: {e}");
                Err(0x0201u16)
            }
        };
        stage = Box::new(st);
    } else {
        let mut st = InspectStage {
            inspector,
            frames,
            next: 0,
        };
        self_test = st.self_test();
        stage = Box::new(st);
    }

    let mut status = Status {
        state: LineState::SelfTest,
        config_crc: crc32(&cfg_bytes),
        bank_crc: crc32(&bank_bytes),
        ..Default::default()
    };
    let hwf = cfg
        .modbus_tcp
        .as_ref()
        .is_none_or(|t| t.word_order == "high_first");
    status.high_word_first = hwf;
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(LogSink)];
    if let Some(p) = &cfg.log.results {
        let f =
            std::fs::File::create(p).map_err(|e| format!("log.results {}: {e}", p.display()))?;
        sinks.push(Box::new(JsonlSink(std::io::BufWriter::new(f))));
    }
    // I/O that fails to open leaves the line Faulted (READY low) with the reason logged and on
    // the error register, instead of a restart loop.
    let mut io_error: Option<u16> = None;
    let serial = match &cfg.serial {
        None => None,
        Some(s) => match server::open_serial(&s.port, s.baud).and_then(|f| Ok((f.try_clone()?, f)))
        {
            Ok((r, w)) => {
                let w = Arc::new(Mutex::new(w));
                sinks.push(Box::new(server::SerialSink(w.clone())));
                Some((r, w))
            }
            Err(e) => {
                log::error!("serial.port {}: {e}", s.port.display());
                io_error = io_error.or(Some(0x0501));
                None
            }
        },
    };
    let rtu = match &cfg.modbus_rtu {
        None => None,
        Some(r) => match server::open_serial(&r.port, r.baud) {
            Ok(f) => Some((f, r.unit_id)),
            Err(e) => {
                log::error!("modbus_rtu.port {}: {e}", r.port.display());
                io_error = io_error.or(Some(0x0501));
                None
            }
        },
    };
    let mut gpio_trigger = None;
    if let (Some(g), Some(b)) = (&cfg.gpio, &board) {
        if let Err(errors) = super::pinmux::verify(&cfg, &cfg_bytes, b, &g.pinmux_report) {
            for e in errors {
                log::error!("{e}");
            }
            io_error = io_error.or(Some(0x0303));
        }
    }
    if let Some(g) = &cfg.gpio {
        use super::gpio::{resolve_pin, GpioSink, GpiocdevOut, OutputTiming};
        let mut outs = Vec::new();
        for (line, spec) in g.outputs() {
            let (chip, off) =
                resolve_pin(spec, board.as_ref()).map_err(|e| format!("gpio {line:?}: {e}"))?;
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
                    io_error = io_error.or(Some(0x0301));
                }
            }
        }
        if let Some(spec) = &g.trigger {
            let (chip, off) =
                resolve_pin(spec, board.as_ref()).map_err(|e| format!("gpio trigger: {e}"))?;
            gpio_trigger = Some((chip, off, Duration::from_millis(g.debounce_ms)));
        }
    }
    let tcp = match &cfg.modbus_tcp {
        None => None,
        Some(t) => Some((
            std::net::TcpListener::bind(&t.bind)
                .map_err(|e| format!("modbus_tcp.bind {}: {e}", t.bind))?,
            t.unit_id,
        )),
    };

    let timing = LineTiming {
        deadline: Duration::from_millis(cfg.timing.deadline_ms),
        fifo: cfg.timing.fifo,
        auto_online: cfg.timing.auto_online,
        fault_after: cfg.timing.fault_after,
    };
    let (handle, join) = arbiter::start(timing, stage, sinks, status);
    if let Some((listener, unit)) = tcp {
        let h = handle.clone();
        std::thread::spawn(move || server::serve_tcp(listener, h, unit, hwf));
    }
    if let Some((port, unit)) = rtu {
        let h = handle.clone();
        std::thread::spawn(move || server::serve_rtu(port, h, unit, hwf));
    }
    if let Some((r, w)) = serial {
        let h = handle.clone();
        std::thread::spawn(move || server::serve_serial_commands(r, w, h));
    }
    if let Some((chip, off, debounce)) = gpio_trigger {
        if let Err(e) = super::gpio::watch_trigger(&chip, off, debounce, handle.clone()) {
            log::error!("{e}");
            io_error = io_error.or(Some(0x0301));
        }
    }
    let self_test = match (self_test, io_error) {
        (Err(c), _) | (Ok(()), Some(c)) => Err(c),
        (Ok(()), None) => Ok(()),
    };
    if let Err(c) = self_test {
        log::error!("self-test failed: error 0x{c:04x}; the line stays Faulted (READY low, every part rejected)");
    }
    handle.self_test(self_test);

    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    if cfg.trigger.kind == TriggerKind::FreeRun {
        let rate = cfg.trigger.rate_hz.unwrap_or(1.0);
        let count = cfg.trigger.count;
        let h = handle.clone();
        std::thread::spawn(move || free_run(h, rate, count));
    }
    // systemd: up, outputs safe (the line may still be Faulted: READY on the wire says that).
    let notifier = super::notify::Notifier::from_env();
    notifier.send("READY=1");
    let ping = notifier.watchdog().map(|w| w / 2);
    let mut last_ping = Instant::now();
    let mut last_alive = u64::MAX;
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
        // Feed the watchdog only while the arbiter makes progress (it wakes at least every
        // 500 ms): a hung arbiter gets the process restarted, with READY low meanwhile.
        if let Some(p) = ping {
            if last_ping.elapsed() >= p && st.alive != last_alive {
                notifier.send("WATCHDOG=1");
                last_alive = st.alive;
                last_ping = Instant::now();
            }
        }
        if !every.is_zero() && last_log.elapsed() >= every {
            last_log = Instant::now();
            let s = handle.status();
            log::info!(
                "counters {:?} state {}",
                s.counters,
                server::state_word(s.state)
            );
        }
    }
    join.join()
        .map_err(|_| "the arbiter thread panicked".to_string())
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
