//! `line.toml`: what `edge-ad run` connects. Unknown fields are refused; every error names the
//! field. Paths are relative to the config file.
//!
//! ```toml
//! [model]
//! model = "/usr/share/edge-ad/demo/efficientnet-lite0.toml"
//! bank = "/var/lib/edge-ad/line1.eab"
//! threads = 0
//! [source]
//! kind = "folder"              # folder | file
//! path = "/var/lib/edge-ad/replay"
//! [trigger]
//! kind = "free_run"            # free_run | external (serial TRIG / Modbus coil only)
//! rate_hz = 5.0
//! [timing]
//! deadline_ms = 500
//! fifo = 4
//! [modbus_tcp]
//! bind = "0.0.0.0:502"
//! [modbus_rtu]
//! port = "/dev/edge-ad-serial"
//! baud = 115200
//! unit_id = 1
//! [serial]
//! port = "/dev/ttyUSB0"
//! baud = 115200
//! [log]
//! results = "/var/lib/edge-ad/results.jsonl"
//! counters_every_s = 60
//! ```

use crate::error::{LineError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The whole config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineConfig {
    /// Board profile (`orin-nano`, `agx-orin`, …, `x86-nvidia`, `cpu-only`); checked against
    /// `/proc/device-tree/compatible` when the device tree exists.
    #[serde(default)]
    pub board: Option<String>,
    /// Model and bank.
    pub model: ModelSection,
    /// Where frames come from.
    pub source: SourceSection,
    /// What triggers a part.
    #[serde(default)]
    pub trigger: TriggerSection,
    /// Deadline and FIFO.
    #[serde(default)]
    pub timing: TimingSection,
    /// Modbus TCP slave.
    #[serde(default)]
    pub modbus_tcp: Option<ModbusTcpSection>,
    /// Modbus RTU slave on a serial port.
    #[serde(default)]
    pub modbus_rtu: Option<ModbusRtuSection>,
    /// Serial ASCII protocol.
    #[serde(default)]
    pub serial: Option<SerialSection>,
    /// GPIO trigger input and PLC outputs.
    #[serde(default)]
    pub gpio: Option<GpioSection>,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// Several products: how the active one is chosen (docs/line.md, "Products").
    #[serde(default)]
    pub products: Option<ProductsSection>,
    /// `[[product]]` entries: id, name, bank (instead of `model.bank`).
    #[serde(default, rename = "product")]
    pub product: Vec<ProductSection>,
    /// The NG archive: frames, heatmaps and records of kept parts.
    #[serde(default)]
    pub archive: Option<ArchiveSection>,
}

/// How the active product is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectKind {
    /// Holding register 101 PRODUCT_SELECT (Modbus TCP or RTU).
    Modbus,
    /// The serial command `PRODUCT <id>`.
    Serial,
    /// A binary code on `products.gpio_lines`, read at each trigger.
    Gpio,
    /// Recognised from each frame (its global features against each product's references).
    Auto,
}

impl SelectKind {
    /// The word in configs and messages.
    pub fn word(self) -> &'static str {
        match self {
            SelectKind::Modbus => "modbus",
            SelectKind::Serial => "serial",
            SelectKind::Gpio => "gpio",
            SelectKind::Auto => "auto",
        }
    }
}

/// `[products]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductsSection {
    /// modbus | serial | gpio | auto.
    pub select: SelectKind,
    /// The product active at start (default: the first `[[product]]`).
    #[serde(default)]
    pub initial: Option<u16>,
    /// `select = "gpio"`: input pins of the product code, least significant bit first (1–10
    /// pins; the code is the product id, active high).
    #[serde(default)]
    pub gpio_lines: Vec<super::gpio::PinSpec>,
}

/// One `[[product]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSection {
    /// 1–999: what the PLC writes to select it.
    pub id: u16,
    /// Shown in replies and records: 1–32 characters of letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Bank file from `edge-ad calibrate`, made with `model.model`.
    pub bank: PathBuf,
    /// Threshold for this product instead of the bank's (scores above are NG).
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// What the archive keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveKeep {
    /// Parts the model called NG.
    Ng,
    /// Every rejected part: NG and ERR (an ERR part has a frame only when one was taken).
    Rejected,
    /// Every part.
    All,
    /// Nothing (the section stays, the archive is off).
    None,
}

/// `[archive]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSection {
    /// Folder of the archive (created when missing).
    pub dir: PathBuf,
    /// ng | rejected | all | none.
    #[serde(default = "default_keep")]
    pub keep: ArchiveKeep,
    /// Size budget in MiB (1–1000000): the oldest entries go first when it is reached.
    #[serde(default = "default_archive_mb")]
    pub max_mb: u64,
}

fn default_keep() -> ArchiveKeep {
    ArchiveKeep::Ng
}
fn default_archive_mb() -> u64 {
    1024
}

/// The largest product id (PRODUCT_SELECT), as smart cameras number jobs 1–999.
pub const MAX_PRODUCT_ID: u16 = 999;

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Model description.
    pub model: PathBuf,
    /// Bank file from `edge-ad calibrate` (one product); with several products each
    /// `[[product]]` names its bank instead.
    #[serde(default)]
    pub bank: Option<PathBuf>,
    /// ONNX override.
    #[serde(default)]
    pub onnx: Option<PathBuf>,
    /// Projector weights.
    #[serde(default)]
    pub projector: Option<PathBuf>,
    /// Threads (0 = all cores).
    #[serde(default)]
    pub threads: usize,
    /// cpu | cuda | auto.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "auto".into()
}

/// Frame source kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The images of a folder, in name order, cycled: replay and soak tests.
    Folder,
    /// One image file, every trigger.
    File,
    /// A V4L2 camera (MMAP streaming); `path` is the device node.
    V4l2,
}

/// `[source]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// folder | file | v4l2.
    pub kind: SourceKind,
    /// Folder, file, or video device node.
    pub path: PathBuf,
    /// v4l2: pixel format (yuyv, nv12, grey, rgb24, mjpeg).
    #[serde(default)]
    pub format: Option<super::pixels::PixelFormat>,
    /// v4l2: frame width.
    #[serde(default)]
    pub width: Option<u32>,
    /// v4l2: frame height.
    #[serde(default)]
    pub height: Option<u32>,
    /// v4l2: frames per second.
    #[serde(default)]
    pub fps: Option<u32>,
    /// V4L2 controls set after the format, by name (`edge-ad cameras` lists them), e.g.
    /// `{ auto_exposure = 1, exposure_time_absolute = 200 }`; booleans as `true`/`false` or 0/1.
    #[serde(default)]
    pub controls: std::collections::BTreeMap<String, ControlValue>,
}

/// A control's value in the config: an integer or a boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ControlValue {
    /// Integer and menu controls.
    Int(i64),
    /// Boolean controls.
    Bool(bool),
}

impl ControlValue {
    /// As the integer V4L2 takes.
    pub fn as_i64(self) -> i64 {
        match self {
            ControlValue::Int(v) => v,
            ControlValue::Bool(b) => i64::from(b),
        }
    }
}

/// Trigger kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// Triggers at a fixed rate.
    FreeRun,
    /// Only triggers from the protocols (serial `TRIG`, Modbus TRIGGER coil).
    #[default]
    External,
    /// Edges on the `gpio.trigger` input (photo-eye through an opto board), plus the protocols.
    Gpio,
}

/// `[trigger]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TriggerSection {
    /// free_run | external.
    #[serde(default)]
    pub kind: TriggerKind,
    /// Free-run rate in triggers per second.
    #[serde(default)]
    pub rate_hz: Option<f64>,
    /// Free-run: stop after this many triggers, drain and exit (tests, soak runs).
    #[serde(default)]
    pub count: Option<u64>,
}

/// `[timing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingSection {
    /// Trigger → verdict deadline in ms.
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    /// Parts in flight at most.
    #[serde(default = "default_fifo")]
    pub fifo: usize,
    /// Go online after the self-test.
    #[serde(default = "default_true")]
    pub auto_online: bool,
    /// Consecutive capture/inference errors that fault the line.
    #[serde(default = "default_fault_after")]
    pub fault_after: u32,
}

fn default_deadline() -> u64 {
    500
}
fn default_fifo() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_fault_after() -> u32 {
    3
}

impl Default for TimingSection {
    fn default() -> Self {
        Self {
            deadline_ms: default_deadline(),
            fifo: default_fifo(),
            auto_online: true,
            fault_after: default_fault_after(),
        }
    }
}

/// `[modbus_tcp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTcpSection {
    /// Address to listen on, e.g. `0.0.0.0:502`.
    pub bind: String,
    /// Unit id answered besides 0 and 255.
    #[serde(default = "default_unit")]
    pub unit_id: u8,
    /// `high_first` (default) or `low_first` word order of 32-bit registers.
    #[serde(default = "default_word_order")]
    pub word_order: String,
    /// Connections open at most (1–64); a new one closes the one idle longest.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Seconds without a request after which a connection is closed (1–3600).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_s: u64,
}

fn default_max_connections() -> u32 {
    8
}
fn default_idle_timeout() -> u64 {
    60
}

fn default_unit() -> u8 {
    1
}
fn default_word_order() -> String {
    "high_first".into()
}

/// `[modbus_rtu]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusRtuSection {
    /// Serial device.
    pub port: PathBuf,
    /// Baud rate.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Slave id 1–247.
    #[serde(default = "default_unit")]
    pub unit_id: u8,
    /// `high_first` (default) or `low_first` word order of 32-bit registers on this port.
    #[serde(default = "default_word_order")]
    pub word_order: String,
}

fn default_baud() -> u32 {
    115200
}

/// `[serial]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSection {
    /// Serial device.
    pub port: PathBuf,
    /// Baud rate.
    #[serde(default = "default_baud")]
    pub baud: u32,
}

/// `[gpio]`: pins are header numbers (with `board`) or `{ chip = "label", offset = n }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioSection {
    /// Trigger input (with `trigger.kind = "gpio"`).
    #[serde(default)]
    pub trigger: Option<super::gpio::PinSpec>,
    /// PASS output (energised for OK).
    #[serde(default)]
    pub pass: Option<super::gpio::PinSpec>,
    /// STROBE output.
    #[serde(default)]
    pub strobe: Option<super::gpio::PinSpec>,
    /// READY output.
    #[serde(default)]
    pub ready: Option<super::gpio::PinSpec>,
    /// HEARTBEAT output.
    #[serde(default)]
    pub heartbeat: Option<super::gpio::PinSpec>,
    /// FAULT output.
    #[serde(default)]
    pub fault: Option<super::gpio::PinSpec>,
    /// Timed REJECT output.
    #[serde(default)]
    pub reject: Option<super::gpio::PinSpec>,
    /// STROBE width.
    #[serde(default = "default_strobe")]
    pub strobe_ms: u64,
    /// REJECT pulse start after the trigger.
    #[serde(default)]
    pub reject_delay_ms: u64,
    /// REJECT pulse width.
    #[serde(default = "default_reject")]
    pub reject_ms: u64,
    /// Kernel debounce of the trigger input.
    #[serde(default = "default_debounce")]
    pub debounce_ms: u64,
    /// The pinmux report `edge-ad pinmux-check` writes (default `/run/edge-ad/pinmux.json`).
    #[serde(default = "default_pinmux_report")]
    pub pinmux_report: PathBuf,
}

impl GpioSection {
    /// The configured output lines with their pins, in one order for every user (the daemon
    /// opens them, `pinmux-check` checks them).
    pub fn outputs(&self) -> impl Iterator<Item = (super::gpio::OutLine, &super::gpio::PinSpec)> {
        use super::gpio::OutLine;
        [
            (OutLine::Pass, &self.pass),
            (OutLine::Strobe, &self.strobe),
            (OutLine::Ready, &self.ready),
            (OutLine::Heartbeat, &self.heartbeat),
            (OutLine::Fault, &self.fault),
            (OutLine::Reject, &self.reject),
        ]
        .into_iter()
        .filter_map(|(line, spec)| spec.as_ref().map(|s| (line, s)))
    }
}

fn default_strobe() -> u64 {
    20
}
fn default_reject() -> u64 {
    50
}
fn default_debounce() -> u64 {
    2
}
fn default_pinmux_report() -> PathBuf {
    PathBuf::from(super::pinmux::DEFAULT_REPORT)
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// One JSON line per resolved tag.
    #[serde(default)]
    pub results: Option<PathBuf>,
    /// Counters to the log every N seconds (0 = never).
    #[serde(default)]
    pub counters_every_s: u64,
    /// Rotate the results log when it would grow past this many MiB (1–100000).
    #[serde(default = "default_results_max_mb")]
    pub results_max_mb: u64,
    /// Rotated results logs kept (`results.1` … `results.<keep>`, 1–100).
    #[serde(default = "default_results_keep")]
    pub results_keep: u32,
}

fn default_results_max_mb() -> u64 {
    64
}
fn default_results_keep() -> u32 {
    4
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            results: None,
            counters_every_s: 0,
            results_max_mb: default_results_max_mb(),
            results_keep: default_results_keep(),
        }
    }
}

/// Baud rates the serial ports accept.
pub const BAUDS: [u32; 5] = [9600, 19200, 38400, 57600, 115200];

impl LineConfig {
    /// The board profile the config names, checked against `/proc/device-tree/compatible` where
    /// that exists (a mismatch names both).
    pub fn board_profile(&self, config_path: &Path) -> Result<Option<edge_ad_boards::Profile>> {
        let Some(name) = &self.board else {
            return Ok(None);
        };
        let bad = |message: String| LineError::Config {
            path: config_path.to_path_buf(),
            message,
        };
        let profile = edge_ad_boards::profile(name).map_err(|e| bad(format!("board: {e}")))?;
        if let Ok(bytes) = std::fs::read("/proc/device-tree/compatible") {
            edge_ad_boards::check(&profile, &bytes).map_err(|e| bad(e.to_string()))?;
        }
        log::info!("board profile {} ({})", profile.name, profile.title);
        Ok(Some(profile))
    }

    /// Read, parse and validate; relative paths resolved against the file's folder. Returns the
    /// config and its bytes (for CONFIG_CRC32).
    pub fn load(path: &Path) -> Result<(Self, Vec<u8>)> {
        let bytes = std::fs::read(path).map_err(|source| LineError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let c = Self::from_bytes(&bytes, path)?;
        Ok((c, bytes))
    }

    /// Parse and validate config bytes read from `path` (named in errors; relative paths are
    /// resolved against its folder). Any bytes give a config or an error, never a panic.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |message: String| LineError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        let mut c: LineConfig =
            toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().to_string()))?;
        c.validate().map_err(bad)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut c.model.model);
        if let Some(p) = c.model.bank.as_mut() {
            fix(p)
        }
        for p in c.product.iter_mut() {
            fix(&mut p.bank)
        }
        if let Some(a) = c.archive.as_mut() {
            fix(&mut a.dir)
        }
        if let Some(p) = c.model.onnx.as_mut() {
            fix(p)
        }
        if let Some(p) = c.model.projector.as_mut() {
            fix(p)
        }
        if c.source.kind != SourceKind::V4l2 {
            fix(&mut c.source.path);
        }
        if let Some(p) = c.log.results.as_mut() {
            fix(p)
        }
        if let Some(g) = c.gpio.as_mut() {
            fix(&mut g.pinmux_report)
        }
        Ok(c)
    }

    /// Every field in its documented range (docs/line.md), fields that do nothing for the
    /// chosen kinds refused; each message names the field and the value.
    fn validate(&self) -> Result<(), String> {
        let src = &self.source;
        let camera = src.kind == SourceKind::V4l2;
        in_range("model.threads", self.model.threads as u64, 0, 256)?;
        if camera {
            let (Some(w), Some(h)) = (src.width, src.height) else {
                return Err("source.width and source.height: required for kind = \"v4l2\"".into());
            };
            in_range("source.width", w as u64, 16, 16384)?;
            in_range("source.height", h as u64, 16, 16384)?;
            if let Some(f) = src.fps {
                in_range("source.fps", f as u64, 1, 1000)?;
            }
        } else {
            let camera_only = [
                ("source.format", src.format.is_some()),
                ("source.width", src.width.is_some()),
                ("source.height", src.height.is_some()),
                ("source.fps", src.fps.is_some()),
                ("source.controls", !src.controls.is_empty()),
            ];
            if let Some((field, _)) = camera_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "{field}: only a camera (kind = \"v4l2\") has it; this source is a {}",
                    if src.kind == SourceKind::Folder {
                        "folder"
                    } else {
                        "file"
                    }
                ));
            }
        }
        if let Some(b) = &self.board {
            edge_ad_boards::profile(b).map_err(|e| format!("board: {e}"))?;
        }
        let t = &self.trigger;
        if t.kind == TriggerKind::FreeRun {
            match t.rate_hz {
                Some(r) if r.is_finite() && (0.001..=1000.0).contains(&r) => {}
                Some(r) => return Err(format!("trigger.rate_hz: {r} must be in 0.001–1000")),
                None => return Err("trigger.rate_hz: required with kind = \"free_run\"".into()),
            }
            if let Some(n) = t.count {
                in_range("trigger.count", n, 1, u32::MAX as u64)?;
            }
        } else if t.rate_hz.is_some() || t.count.is_some() {
            return Err(format!(
                "trigger.{}: only for kind = \"free_run\"",
                if t.rate_hz.is_some() {
                    "rate_hz"
                } else {
                    "count"
                }
            ));
        }
        let gpio_trigger = self.gpio.as_ref().is_some_and(|g| g.trigger.is_some());
        if t.kind == TriggerKind::Gpio && !gpio_trigger {
            return Err("trigger.kind = \"gpio\" needs gpio.trigger (the input pin)".into());
        }
        if t.kind != TriggerKind::Gpio && gpio_trigger {
            return Err(format!(
                "gpio.trigger: set, but trigger.kind = \"{}\" ignores it (use kind = \"gpio\")",
                match t.kind {
                    TriggerKind::FreeRun => "free_run",
                    _ => "external",
                }
            ));
        }
        if let Some(g) = &self.gpio {
            in_range("gpio.strobe_ms", g.strobe_ms, 1, 10_000)?;
            in_range("gpio.reject_delay_ms", g.reject_delay_ms, 0, 60_000)?;
            in_range("gpio.reject_ms", g.reject_ms, 1, 10_000)?;
            in_range("gpio.debounce_ms", g.debounce_ms, 0, 100)?;
        }
        let tm = &self.timing;
        // The unit's TimeoutStopSec (10 s) must cover a drain: deadline + 2 s.
        in_range("timing.deadline_ms", tm.deadline_ms, 1, MAX_DEADLINE_MS)?;
        in_range("timing.fifo", tm.fifo as u64, 1, MAX_FIFO as u64)?;
        in_range("timing.fault_after", tm.fault_after as u64, 1, 1000)?;
        if let Some(t) = &self.modbus_tcp {
            word_order("modbus_tcp.word_order", &t.word_order)?;
            in_range("modbus_tcp.unit_id", t.unit_id as u64, 1, 247)?;
            in_range(
                "modbus_tcp.max_connections",
                t.max_connections as u64,
                1,
                64,
            )?;
            in_range("modbus_tcp.idle_timeout_s", t.idle_timeout_s, 1, 3600)?;
        }
        if let Some(r) = &self.modbus_rtu {
            word_order("modbus_rtu.word_order", &r.word_order)?;
            in_range("modbus_rtu.unit_id", r.unit_id as u64, 1, 247)?;
            if !BAUDS.contains(&r.baud) {
                return Err(format!("modbus_rtu.baud: {} (one of {BAUDS:?})", r.baud));
            }
        }
        if let Some(s) = &self.serial {
            if !BAUDS.contains(&s.baud) {
                return Err(format!("serial.baud: {} (one of {BAUDS:?})", s.baud));
            }
        }
        if let (Some(a), Some(b)) = (&self.serial, &self.modbus_rtu) {
            if a.port == b.port {
                return Err(format!(
                    "serial.port and modbus_rtu.port are both {}: one protocol per port",
                    a.port.display()
                ));
            }
        }
        self.validate_products()?;
        if let Some(a) = &self.archive {
            in_range("archive.max_mb", a.max_mb, 1, 1_000_000)?;
        }
        let l = &self.log;
        in_range("log.counters_every_s", l.counters_every_s, 0, 86_400)?;
        in_range("log.results_max_mb", l.results_max_mb, 1, 100_000)?;
        in_range("log.results_keep", l.results_keep as u64, 1, 100)?;
        Ok(())
    }
}

impl LineConfig {
    /// The products the line inspects, in config order: the `[[product]]` entries, or one
    /// product (id 1, named after the bank file) for `model.bank`.
    pub fn product_list(&self) -> Vec<ProductSection> {
        match &self.model.bank {
            Some(bank) if self.product.is_empty() => vec![ProductSection {
                id: 1,
                name: bank
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "default".into()),
                bank: bank.clone(),
                threshold: None,
            }],
            _ => self.product.clone(),
        }
    }

    /// `[products]` and `[[product]]`: one bank source, ids 1–999 and names unique, a select
    /// mode whose inputs are configured.
    fn validate_products(&self) -> Result<(), String> {
        match (&self.model.bank, self.product.is_empty()) {
            (Some(_), false) => {
                return Err("model.bank: set together with [[product]] entries; give each product its bank and drop model.bank".into())
            }
            (None, true) => {
                return Err("model.bank: missing (or give [[product]] entries, each with its bank)".into())
            }
            _ => {}
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.product.iter().enumerate() {
            let at = format!("product[{i}]");
            if !(1..=MAX_PRODUCT_ID).contains(&p.id) {
                return Err(format!("{at}.id: {} is outside 1–{MAX_PRODUCT_ID}", p.id));
            }
            if !ids.insert(p.id) {
                return Err(format!("{at}.id: {} is used by an earlier product", p.id));
            }
            let name_ok = (1..=32).contains(&p.name.len())
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !name_ok {
                return Err(format!(
                    "{at}.name: {:?} must be 1–32 letters, digits, '-', '_' or '.' (it is sent in serial replies)",
                    p.name
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(format!(
                    "{at}.name: {:?} is used by an earlier product",
                    p.name
                ));
            }
            if let Some(t) = p.threshold {
                if !(t.is_finite() && t > 0.0) {
                    return Err(format!(
                        "{at}.threshold: {t} must be a finite number above 0"
                    ));
                }
            }
        }
        let Some(ps) = &self.products else {
            if self.product.len() > 1 {
                return Err("products.select: several [[product]] entries need [products] select = \"modbus\" | \"serial\" | \"gpio\"".into());
            }
            return Ok(());
        };
        // With model.bank alone the bank may be a set of several products: its count and ids
        // are checked once it is loaded (daemon).
        let named = !self.product.is_empty();
        if let (Some(init), true) = (ps.initial, named) {
            if !self.product_list().iter().any(|p| p.id == init) {
                return Err(format!(
                    "products.initial: {init} is not the id of a [[product]]"
                ));
            }
        }
        let has_gpio_lines = !ps.gpio_lines.is_empty();
        match ps.select {
            SelectKind::Modbus if self.modbus_tcp.is_none() && self.modbus_rtu.is_none() => {
                return Err("products.select = \"modbus\": needs [modbus_tcp] or [modbus_rtu] (register 101 PRODUCT_SELECT)".into())
            }
            SelectKind::Serial if self.serial.is_none() => {
                return Err("products.select = \"serial\": needs [serial] (the PRODUCT command)".into())
            }
            SelectKind::Auto if named && self.product.len() < 2 => {
                return Err("products.select = \"auto\": needs at least 2 [[product]] entries to tell apart".into())
            }
            SelectKind::Gpio => {
                if self.gpio.is_none() {
                    return Err("products.select = \"gpio\": needs a [gpio] section".into());
                }
                in_range("products.gpio_lines (count)", ps.gpio_lines.len() as u64, 1, 10)?;
                let g = self.gpio.as_ref().expect("checked above");
                let used: Vec<&super::gpio::PinSpec> = g
                    .trigger
                    .iter()
                    .chain(g.outputs().map(|(_, p)| p))
                    .collect();
                for (i, p) in ps.gpio_lines.iter().enumerate() {
                    if ps.gpio_lines[..i].contains(p) || used.contains(&p) {
                        return Err(format!(
                            "products.gpio_lines[{i}]: {p:?} is used twice (another code line, the trigger or an output)"
                        ));
                    }
                }
            }
            _ if has_gpio_lines => {
                return Err(format!(
                    "products.gpio_lines: only for select = \"gpio\" (select is \"{}\")",
                    ps.select.word()
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// The longest `timing.deadline_ms`: SIGTERM drains the parts in flight, which takes up to the
/// deadline, and the systemd unit gives the drain 10 s (TimeoutStopSec) with 2 s for the rest.
pub const MAX_DEADLINE_MS: u64 = 8_000;

/// The largest `timing.fifo`: parts in flight are frames in memory; more than this is a line
/// that cannot keep up, not a buffer.
pub const MAX_FIFO: usize = 64;

fn in_range(field: &str, v: u64, lo: u64, hi: u64) -> Result<(), String> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(format!("{field}: {v} is outside {lo}–{hi}"))
    }
}

fn word_order(field: &str, v: &str) -> Result<(), String> {
    if matches!(v, "high_first" | "low_first") {
        Ok(())
    } else {
        Err(format!("{field}: `{v}` (expected high_first or low_first)"))
    }
}

/// An example line config for `profile` (`edge-ad example-config`; the package ships one per
/// board as `/etc/edge-ad/examples/<board>.toml`): a UVC camera, the board's default header
/// pins with a GPIO trigger where it has a 40-pin header (else triggers over Modbus or serial),
/// Modbus TCP on port 502, and the bundled demo model until a production model is installed.
pub fn example(profile: &edge_ad_boards::Profile) -> String {
    let io = match profile.pins {
        Some(p) => format!(
            "[trigger]\n# Photo-eye on header pin {t} (through an opto board); Modbus/serial triggers work too.\nkind = \"gpio\"\n\n[gpio]\n# 40-pin header pins ({title} defaults); `{{ chip = \"label\", offset = N }}` for other lines.\ntrigger = {t}\npass = {p}\nstrobe = {s}\nready = {r}\nheartbeat = {h}\nstrobe_ms = 20\ndebounce_ms = 2\n",
            t = p.trigger_in,
            p = p.pass_out,
            s = p.strobe_out,
            r = p.ready_out,
            h = p.heartbeat_out,
            title = profile.title,
        ),
        None => "[trigger]\n# No 40-pin header: the PLC triggers over Modbus (TRIGGER coil) or serial (`TRIG`).\nkind = \"external\"\n".into(),
    };
    format!(
        "# edge-ad line config for {title} (board profile `{name}`), from `edge-ad example-config`.\n\
         # Copy it to /etc/edge-ad/line.toml and adjust; the service starts once that file exists:\n\
         #   sudo systemctl enable --now edge-ad\n\
         # Every field: /usr/share/doc/edge-ad/line.md. Relative paths are relative to this file.\n\
         board = \"{name}\"\n\n\
         [model]\n\
         # The bundled demo backbone; point this at a production model description when installed.\n\
         model = \"/usr/share/edge-ad/demo/efficientnet-lite0.toml\"\n\
         # Written by `edge-ad calibrate --refs 8 --images <good parts> --out /var/lib/edge-ad/bank.eab`.\n\
         bank = \"/var/lib/edge-ad/bank.eab\"\n\
         threads = 0\n\
         device = \"auto\"\n\n\
         [source]\n\
         # `edge-ad cameras` lists the devices and what they deliver.\n\
         kind = \"v4l2\"\n\
         path = \"/dev/video0\"\n\
         format = \"yuyv\"\n\
         width = 1280\n\
         height = 720\n\
         fps = 30\n\
         # Fix exposure and white balance so the parts look the same all day (names, ranges:\n\
         # `edge-ad cameras`), e.g.\n\
         # controls = {{ auto_exposure = 1, exposure_time_absolute = 200, white_balance_automatic = false }}\n\n\
         {io}\n\
         [timing]\n\
         # From trigger to verdict; a part without a verdict by then is rejected.\n\
         deadline_ms = 300\n\
         fifo = 4\n\n\
         [modbus_tcp]\n\
         bind = \"0.0.0.0:502\"\n\
         unit_id = 1\n\n\
         [log]\n\
         # NG and ERR parts go to the journal; `results = \"<file>\"` adds a JSON line per part.\n\
         counters_every_s = 60\n",
        title = profile.title,
        name = profile.name,
    )
}

#[cfg(test)]
mod tests {
    /// Camera controls: integers and booleans, only for a camera source.
    #[test]
    fn camera_controls_parse_and_need_a_camera() {
        let dir = std::env::temp_dir().join(format!("edge-ad-controls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("line.toml");
        let write = |source: &str| {
            std::fs::write(
                &path,
                format!("[model]\nmodel = \"m.toml\"\nbank = \"b.eab\"\n[source]\n{source}\ncontrols = {{ auto_exposure = 1, white_balance_automatic = false }}\n"),
            )
            .unwrap();
        };
        write("kind = \"v4l2\"\npath = \"/dev/video0\"\nwidth = 640\nheight = 480");
        let (c, _) = LineConfig::load(&path).unwrap();
        let v: Vec<(&str, i64)> = c
            .source
            .controls
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_i64()))
            .collect();
        assert_eq!(v, [("auto_exposure", 1), ("white_balance_automatic", 0)]);
        write("kind = \"folder\"\npath = \"parts\"");
        let e = LineConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("source.controls"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every board's example is a valid config with that board's default pins.
    #[test]
    fn examples_parse_with_the_board_defaults() {
        let dir = std::env::temp_dir().join(format!("edge-ad-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for profile in edge_ad_boards::profiles() {
            let path = dir.join(format!("{}.toml", profile.name));
            std::fs::write(&path, example(&profile)).unwrap();
            let (c, _) = LineConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.board.as_deref(), Some(profile.name.as_str()));
            assert_eq!(c.source.kind, SourceKind::V4l2);
            match profile.pins {
                Some(p) => {
                    let g = c.gpio.expect("gpio section");
                    use crate::gpio::PinSpec::Header;
                    assert_eq!(c.trigger.kind, TriggerKind::Gpio);
                    assert_eq!(
                        [g.trigger, g.pass, g.strobe, g.ready, g.heartbeat],
                        [
                            p.trigger_in,
                            p.pass_out,
                            p.strobe_out,
                            p.ready_out,
                            p.heartbeat_out
                        ]
                        .map(|n| Some(Header(n)))
                    );
                }
                None => {
                    assert!(c.gpio.is_none());
                    assert_eq!(c.trigger.kind, TriggerKind::External);
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;

    const MIN: &str = "[model]\nmodel = \"m.toml\"\nbank = \"b.eab\"\n[source]\nkind = \"folder\"\npath = \"imgs\"\n";

    fn parse(extra: &str) -> std::result::Result<LineConfig, String> {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("line.toml");
        std::fs::write(&p, format!("{MIN}{extra}")).unwrap();
        LineConfig::load(&p).map(|c| c.0).map_err(|e| e.to_string())
    }

    fn parse_products(text: &str) -> std::result::Result<LineConfig, String> {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("line.toml");
        let head = "[model]\nmodel = \"m.toml\"\n[source]\nkind = \"folder\"\npath = \"imgs\"\n[modbus_tcp]\nbind = \"127.0.0.1:1\"\n";
        std::fs::write(&p, format!("{head}{text}")).unwrap();
        LineConfig::load(&p).map(|c| c.0).map_err(|e| e.to_string())
    }

    const TWO: &str = "[[product]]\nid = 1\nname = \"a\"\nbank = \"a.eab\"\n[[product]]\nid = 2\nname = \"b\"\nbank = \"b.eab\"\nthreshold = 0.5\n";

    /// Products: ids and names unique and in range, one bank source, a select mode whose
    /// inputs are configured; each refusal names the field and the value.
    #[test]
    fn products_are_checked_by_name() {
        let c = parse_products(&format!(
            "[products]\nselect = \"modbus\"\ninitial = 2\n{TWO}"
        ))
        .unwrap();
        let list = c.product_list();
        assert_eq!(list.len(), 2);
        assert!(list[1].bank.is_absolute() && list[1].bank.ends_with("b.eab"));
        assert_eq!(list[1].threshold, Some(0.5));
        let cases = [
            (format!("[products]\nselect = \"modbus\"\n{TWO}{TWO}"), "product[2].id: 1 is used by an earlier product"),
            (TWO.to_string(), "products.select: several [[product]] entries"),
            (format!("[products]\nselect = \"serial\"\n{TWO}"), "products.select = \"serial\": needs [serial]"),
            (format!("[products]\nselect = \"gpio\"\n{TWO}"), "products.select = \"gpio\": needs a [gpio] section"),
            (format!("[products]\nselect = \"modbus\"\ngpio_lines = [29]\n{TWO}"), "products.gpio_lines: only for select = \"gpio\""),
            (
                format!("[gpio]\ntrigger = 29\n[trigger]\nkind = \"gpio\"\n[products]\nselect = \"gpio\"\ngpio_lines = [31, 31]\n{TWO}"),
                "products.gpio_lines[1]: Header(31) is used twice",
            ),
            (
                format!("[gpio]\ntrigger = 29\n[trigger]\nkind = \"gpio\"\n[products]\nselect = \"gpio\"\ngpio_lines = [29]\n{TWO}"),
                "products.gpio_lines[0]: Header(29) is used twice",
            ),
            (format!("[products]\nselect = \"modbus\"\ninitial = 7\n{TWO}"), "products.initial: 7"),
            ("[products]\nselect = \"auto\"\n[[product]]\nid = 1\nname = \"a\"\nbank = \"a\"\n".into(), "products.select = \"auto\": needs at least 2"),
            (format!("[products]\nselect = \"auto2\"\n{TWO}"), "unknown variant `auto2`"),
            ("[products]\nselect = \"modbus\"\n[[product]]\nid = 0\nname = \"a\"\nbank = \"a\"\n".into(), "product[0].id: 0 is outside 1–999"),
            ("[products]\nselect = \"modbus\"\n[[product]]\nid = 1000\nname = \"a\"\nbank = \"a\"\n".into(), "product[0].id: 1000"),
            ("[products]\nselect = \"modbus\"\n[[product]]\nid = 1\nname = \"a,b\"\nbank = \"a\"\n".into(), "product[0].name: \"a,b\""),
            ("[[product]]\nid = 1\nname = \"a\"\nbank = \"a\"\nthreshold = -1.0\n".into(), "product[0].threshold: -1"),
            ("[[product]]\nid = 1\nname = \"a\"\nbank = \"a\"\n[[product]]\nid = 2\nname = \"a\"\nbank = \"b\"\n[products]\nselect = \"modbus\"\n".into(), "product[1].name: \"a\" is used by an earlier product"),
            ("".into(), "model.bank: missing"),
            ("[archive]\ndir = \"x\"\nmax_mb = 0\n[[product]]\nid = 1\nname = \"a\"\nbank = \"a\"\n".into(), "archive.max_mb: 0"),
            ("[archive]\ndir = \"x\"\nkeep = \"some\"\n[[product]]\nid = 1\nname = \"a\"\nbank = \"a\"\n".into(), "unknown variant `some`"),
        ];
        for (text, want) in cases {
            let e = parse_products(&text).unwrap_err();
            assert!(e.contains(want), "{text}\n→ {e}\nwanted {want}");
        }
        // model.bank together with products is refused; model.bank alone is product 1.
        let e = parse(&format!(
            "[products]\nselect = \"modbus\"\n[modbus_tcp]\nbind = \"127.0.0.1:1\"\n{TWO}"
        ))
        .unwrap_err();
        assert!(
            e.contains("model.bank: set together with [[product]]"),
            "{e}"
        );
        let one = parse("").unwrap().product_list();
        assert_eq!((one.len(), one[0].id, one[0].name.as_str()), (1, 1, "b"));
    }

    /// Every numeric field is refused outside its range, naming the field (M5: fault_after = 0
    /// used to fault the line on its first NG; M6: a huge fifo aborted on allocation).
    #[test]
    fn numeric_fields_are_bounded_and_named() {
        let cases = [
            ("[timing]\nfault_after = 0\n", "timing.fault_after: 0"),
            (
                "[timing]\nfifo = 100000000000\n",
                "timing.fifo: 100000000000",
            ),
            (
                "[timing]\ndeadline_ms = 9000\n",
                "timing.deadline_ms: 9000 is outside 1–8000",
            ),
            (
                "[trigger]\nkind = \"free_run\"\nrate_hz = 1e-300\n",
                "trigger.rate_hz",
            ),
            ("[log]\nresults_keep = 0\n", "log.results_keep: 0"),
            ("[log]\nresults_max_mb = 0\n", "log.results_max_mb: 0"),
            (
                "[modbus_tcp]\nbind = \"127.0.0.1:1\"\nmax_connections = 0\n",
                "modbus_tcp.max_connections: 0",
            ),
            (
                "[modbus_tcp]\nbind = \"127.0.0.1:1\"\nidle_timeout_s = 0\n",
                "modbus_tcp.idle_timeout_s: 0",
            ),
            (
                "[modbus_rtu]\nport = \"/dev/x\"\nword_order = \"odd\"\n",
                "modbus_rtu.word_order",
            ),
            (
                "[trigger]\nkind = \"free_run\"\nrate_hz = 5.0\ncount = 0\n",
                "trigger.count: 0",
            ),
            ("[trigger]\nrate_hz = 5.0\n", "trigger.rate_hz: only"),
            (
                "[trigger]\nkind = \"external\"\n[gpio]\ntrigger = 29\n",
                "gpio.trigger: set",
            ),
            (
                "[trigger]\nkind = \"gpio\"\n[gpio]\ntrigger = 29\ndebounce_ms = 1000\n",
                "gpio.debounce_ms: 1000",
            ),
        ];
        for (extra, want) in cases {
            let e = parse(extra).unwrap_err();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let e = parse("").map(|c| c.timing.fault_after).unwrap();
        assert_eq!(e, 3);
    }

    /// Camera-only fields are refused for a folder or file source.
    #[test]
    fn camera_fields_are_refused_for_a_folder() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("line.toml");
        std::fs::write(&p, "[model]\nmodel = \"m\"\nbank = \"b\"\n[source]\nkind = \"folder\"\npath = \"x\"\nwidth = 640\n").unwrap();
        let e = LineConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("source.width: only a camera"), "{e}");
    }

    #[test]
    fn minimal_config_has_safe_defaults_and_resolved_paths() {
        let c = parse("").unwrap();
        assert_eq!(c.trigger.kind, TriggerKind::External);
        assert_eq!((c.timing.deadline_ms, c.timing.fifo), (500, 4));
        assert!(c.model.bank.as_ref().unwrap().is_absolute() && c.source.path.ends_with("imgs"));
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse("[trigger]\nkind = \"free_run\"\n").unwrap_err();
        assert!(e.contains("trigger.rate_hz"), "{e}");
        let e = parse("[timing]\ndeadline_ms = 0\n").unwrap_err();
        assert!(e.contains("timing.deadline_ms"), "{e}");
        let e = parse("[modbus_tcp]\nbind = \"x\"\nword_order = \"middle\"\n").unwrap_err();
        assert!(e.contains("word_order") && e.contains("middle"), "{e}");
        let e = parse("[modbus_rtu]\nport = \"/dev/x\"\nbaud = 1234\n").unwrap_err();
        assert!(e.contains("modbus_rtu.baud") && e.contains("1234"), "{e}");
        let e = parse("[source2]\n").unwrap_err();
        assert!(e.contains("source2"), "{e}");
        let e = parse("[trigger]\nkind = \"gpio\"\n").unwrap_err();
        assert!(e.contains("gpio.trigger"), "{e}");
        let c = parse("[trigger]\nkind = \"gpio\"\n[gpio]\ntrigger = 29\npass = { chip = \"tegra234-gpio\", offset = 106 }\n").unwrap();
        let g = c.gpio.unwrap();
        assert_eq!(g.trigger, Some(crate::gpio::PinSpec::Header(29)));
        assert_eq!(g.strobe_ms, 20);
        let e = parse("[trigger]\nkind = \"gpio_edge\"\n").unwrap_err();
        assert!(e.contains("gpio_edge"), "{e}");
    }
}
