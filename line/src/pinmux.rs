//! The pinmux check of a line config's GPIO pins (line-side reference §3.3, error 0x0303).
//!
//! Reading PADCTL needs `/dev/mem`, so the check runs in two halves: `edge-ad pinmux-check`, as
//! the unit's privileged `ExecStartPre=+`, reads the registers and writes a report
//! (`/run/edge-ad/pinmux.json`); the unprivileged daemon reads that report during its self-test
//! and stays Faulted (error 0x0303, READY low) when a pin is not muxed for its use. A daemon
//! started as root reads the registers itself.

use std::path::{Path, PathBuf};

use edge_ad_boards::pinmux::{padctl_address, read_u32, Direction, PadCheck, Padctl};
use edge_ad_boards::Profile;
use serde::{Deserialize, Serialize};

use super::config::LineConfig;
use super::gpio::PinSpec;

/// Where the unit's `ExecStartPre` writes the report and the daemon looks for it.
pub const DEFAULT_REPORT: &str = "/run/edge-ad/pinmux.json";

/// One checked pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinEntry {
    /// Config role (`pass`, `trigger`, …).
    pub role: String,
    /// Header pin.
    pub pin: u8,
    /// Tegra port.
    pub port: String,
    /// GPIO chip label.
    pub chip: String,
    /// Line offset.
    pub line: u32,
    /// `input` or `output`.
    pub direction: String,
    /// PADCTL address, hex.
    pub padctl: String,
    /// Register value, hex.
    pub value: String,
    /// The `E_PINMUX` message, when the pad does not serve the pin's use.
    pub error: Option<String>,
}

/// What `edge-ad pinmux-check` found for one config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// CRC-32 of the config file the report is for (a report of another config is ignored).
    pub config_crc: u32,
    /// Board profile, if the config names one.
    pub board: Option<String>,
    /// Pins whose PADCTL was read.
    pub pins: Vec<PinEntry>,
    /// Pins that could not be checked, with the reason (no PADCTL address known, chip/offset
    /// form, a board without the check).
    pub unchecked: Vec<String>,
}

impl Report {
    /// The `E_PINMUX` messages.
    pub fn errors(&self) -> Vec<&str> {
        self.pins
            .iter()
            .filter_map(|p| p.error.as_deref())
            .collect()
    }
}

/// The GPIO pins of a config with the direction edge-ad drives them in.
fn config_pins(cfg: &LineConfig) -> Vec<(&'static str, &PinSpec, Direction)> {
    let Some(g) = &cfg.gpio else {
        return Vec::new();
    };
    let mut pins: Vec<_> = g
        .trigger
        .iter()
        .map(|p| ("trigger", p, Direction::Input))
        .collect();
    pins.extend(
        g.outputs()
            .map(|(line, p)| (line.role(), p, Direction::Output)),
    );
    pins
}

/// Why the pinmux check could not run or its report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PinmuxError {
    /// The board has no such header pin.
    #[error(transparent)]
    Board(#[from] edge_ad_boards::BoardError),
    /// A register or file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (`/dev/mem` with the register address, or the report).
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The report could not be serialised.
    #[error("pinmux report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Read the PADCTL register of every header pin of `cfg` through `mem` (`/dev/mem`).
pub fn check(
    cfg: &LineConfig,
    config_bytes: &[u8],
    board: Option<&Profile>,
    mem: &Path,
) -> Result<Report, PinmuxError> {
    let mut report = Report {
        config_crc: super::status::crc32(config_bytes),
        board: board.map(|b| b.name.clone()),
        pins: Vec::new(),
        unchecked: Vec::new(),
    };
    for (role, spec, direction) in config_pins(cfg) {
        let pin = match spec {
            PinSpec::Header(pin) => *pin,
            PinSpec::Line { chip, offset } => {
                report.unchecked.push(format!(
                    "gpio.{role} ({chip} line {offset}): given as chip/offset, its pad is unknown"
                ));
                continue;
            }
        };
        let Some(b) = board else {
            report
                .unchecked
                .push(format!("gpio.{role} (header pin {pin}): no board profile"));
            continue;
        };
        let (chip, line) = edge_ad_boards::header_pin(b, pin)?;
        let Some(address) = padctl_address(&b.name, pin) else {
            report.unchecked.push(format!(
                "gpio.{role} (header pin {pin}): NVIDIA's tables give no PADCTL address on {}",
                b.title
            ));
            continue;
        };
        let value = read_u32(mem, address).map_err(|source| PinmuxError::Io {
            path: PathBuf::from(format!("{} at {address:#010x}", mem.display())),
            source,
        })?;
        let c = PadCheck {
            pin,
            port: line.port.into(),
            chip: chip.clone(),
            line: line.offset,
            direction,
            address,
            value: Padctl(value),
        };
        report.pins.push(PinEntry {
            role: role.into(),
            pin,
            port: c.port.clone(),
            chip,
            line: line.offset,
            direction: match direction {
                Direction::Input => "input",
                Direction::Output => "output",
            }
            .into(),
            padctl: format!("{address:#010x}"),
            value: format!("{value:#010x}"),
            error: c.error(),
        });
    }
    Ok(report)
}

/// Write the report atomically (temporary file, then rename), creating its folder.
pub fn write_report(path: &Path, report: &Report) -> Result<(), PinmuxError> {
    let io = |p: &Path| {
        let path = p.to_path_buf();
        move |source| PinmuxError::Io { path, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let json = serde_json::to_vec_pretty(report)?;
    std::fs::write(&tmp, json).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The daemon's half: `Err(messages)` when a pin is not muxed for its use (error 0x0303). A
/// missing or stale report is logged as "not verified" and passes (a line started by hand);
/// as root the registers are read directly.
pub fn verify(
    cfg: &LineConfig,
    config_bytes: &[u8],
    board: &Profile,
    report_path: &Path,
) -> Result<(), Vec<String>> {
    // PADCTL addresses are known for Orin (tegra234) only.
    if config_pins(cfg).is_empty() || board.soc != "tegra234" {
        return Ok(());
    }
    let report = match std::fs::read(report_path) {
        Ok(bytes) => match serde_json::from_slice::<Report>(&bytes) {
            Ok(r) if r.config_crc == super::status::crc32(config_bytes) => Some(r),
            Ok(_) => {
                log::warn!(
                    "pinmux not verified: {} is for another config (run `edge-ad pinmux-check` again)",
                    report_path.display()
                );
                None
            }
            Err(e) => {
                log::warn!("pinmux not verified: {}: {e}", report_path.display());
                None
            }
        },
        // SAFETY: geteuid has no preconditions.
        Err(_) if unsafe { libc::geteuid() } == 0 => {
            match check(cfg, config_bytes, Some(board), Path::new("/dev/mem")) {
                Ok(r) => Some(r),
                Err(e) => {
                    log::warn!("pinmux not verified: {e}");
                    None
                }
            }
        }
        Err(e) => {
            log::warn!(
                "pinmux not verified: {}: {e} (the systemd unit's ExecStartPre runs `edge-ad pinmux-check` as root)",
                report_path.display()
            );
            None
        }
    };
    let Some(report) = report else {
        return Ok(());
    };
    for u in &report.unchecked {
        log::warn!("pinmux not checked: {u}");
    }
    let errors: Vec<String> = report.errors().into_iter().map(String::from).collect();
    if errors.is_empty() {
        log::info!("pinmux: {} pin(s) muxed as GPIO", report.pins.len());
        Ok(())
    } else {
        Err(errors)
    }
}
