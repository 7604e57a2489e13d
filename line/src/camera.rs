//! V4L2 capture through `v4l` 0.14 (line-side.md §2): MMAP streaming with all buffers queued, the
//! payload taken from each buffer's `bytesused`, a capture thread that dequeues continuously (so
//! a trigger never gets a stale frame), a dequeue timeout, and reconnection with exponential
//! backoff (100 ms doubling to 5 s, ±20 % jitter) when the camera is unplugged.

use super::arbiter::{Stage, StageResult};
use super::pixels::{to_rgb, PixelFormat, RawFrame};
use super::products::Judge;
use super::status::ErrCause;
use edge_ad::preprocess::Rgb8;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use v4l::buffer::Type;
use v4l::io::traits::CaptureStream;
use v4l::prelude::*;
use v4l::video::Capture;

/// What to open.
#[derive(Debug, Clone)]
pub struct CameraConfig {
    /// Device node (prefer a stable `/dev/v4l/by-id/…` path or a udev symlink).
    pub path: PathBuf,
    /// Pixel format.
    pub format: PixelFormat,
    /// Width and height.
    pub size: (u32, u32),
    /// Frames per second.
    pub fps: u32,
    /// Controls to set after the format (`[source.controls]`), by [`control_key`] name: a line
    /// needs fixed exposure and white balance, or the parts' appearance drifts with the light.
    pub controls: BTreeMap<String, i64>,
}

/// A control's name as configs spell it: lower case, every run of other characters one `_`
/// (the names `v4l2-ctl --list-ctrls` prints): "Exposure Time, Absolute" → `exposure_time_absolute`.
pub fn control_key(name: &str) -> String {
    let mut key = String::new();
    for ch in name.chars() {
        if ch.is_ascii_alphanumeric() {
            key.push(ch.to_ascii_lowercase());
        } else if !key.is_empty() && !key.ends_with('_') {
            key.push('_');
        }
    }
    key.trim_end_matches('_').to_string()
}

/// The controls to set, checked against what the camera offers, in a workable order: mode
/// controls (`…auto…`) first, since a camera ignores a manual exposure or white balance while
/// its automatic mode is on.
pub fn control_plan(
    offered: &[v4l::control::Description],
    wanted: &BTreeMap<String, i64>,
) -> Result<Vec<(v4l::control::Control, String)>, String> {
    use v4l::control::{Control, Type, Value};
    let mut plan = Vec::new();
    for (key, &value) in wanted {
        let Some(d) = offered.iter().find(|d| control_key(&d.name) == *key) else {
            let names: Vec<String> = offered
                .iter()
                .filter(|d| d.typ != Type::CtrlClass)
                .map(|d| control_key(&d.name))
                .collect();
            return Err(format!(
                "source.controls.{key}: the camera has no such control (it has: {})",
                names.join(", ")
            ));
        };
        let value = match d.typ {
            Type::Boolean if value == 0 || value == 1 => Value::Boolean(value == 1),
            Type::Integer | Type::Integer64 | Type::Menu | Type::IntegerMenu
                if (d.minimum..=d.maximum).contains(&value) =>
            {
                Value::Integer(value)
            }
            Type::Boolean | Type::Integer | Type::Integer64 | Type::Menu | Type::IntegerMenu => {
                return Err(format!(
                    "source.controls.{key}: {value} is outside {}..={}",
                    d.minimum, d.maximum
                ))
            }
            other => {
                return Err(format!(
                    "source.controls.{key}: a {other:?} control cannot be set from the config"
                ))
            }
        };
        plan.push((Control { id: d.id, value }, key.clone()));
    }
    plan.sort_by_key(|(_, k)| !k.contains("auto"));
    Ok(plan)
}

/// The camera's controls; `v4l` 0.14 panics on a control type it does not know, which becomes an
/// error here instead of taking the daemon down.
fn query_controls(dev: &Device) -> io::Result<Vec<v4l::control::Description>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dev.query_controls())).unwrap_or_else(
        |_| {
            Err(io::Error::other(
                "the camera reports a control type the v4l crate does not know",
            ))
        },
    )
}

/// Set `[source.controls]` and read each back (a driver may round or refuse silently).
fn apply_controls(dev: &Device, cfg: &CameraConfig) -> io::Result<()> {
    if cfg.controls.is_empty() {
        return Ok(());
    }
    let offered = query_controls(dev)?;
    let plan = control_plan(&offered, &cfg.controls).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {e}", cfg.path.display()),
        )
    })?;
    for (ctrl, key) in plan {
        let (id, want) = (ctrl.id, format!("{:?}", ctrl.value));
        dev.set_control(ctrl).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: source.controls.{key}: {e}", cfg.path.display()),
            )
        })?;
        match dev.control(id) {
            Ok(got) if format!("{:?}", got.value) != want => log::warn!(
                "camera {}: {key} set to {want}, reads back {:?}",
                cfg.path.display(),
                got.value
            ),
            Ok(_) => log::info!("camera {}: {key} = {want}", cfg.path.display()),
            Err(e) => log::warn!(
                "camera {}: {key}: cannot read back: {e}",
                cfg.path.display()
            ),
        }
    }
    Ok(())
}

fn fourcc(f: PixelFormat) -> v4l::FourCC {
    v4l::FourCC::new(match f {
        PixelFormat::Yuyv => b"YUYV",
        PixelFormat::Nv12 => b"NV12",
        PixelFormat::Grey => b"GREY",
        PixelFormat::Rgb24 => b"RGB3",
        PixelFormat::Mjpeg => b"MJPG",
    })
}

/// One pixel format of a camera: fourcc, description, and (width, height, frame rates) sizes.
pub type FormatInfo = (String, String, Vec<(u32, u32, Vec<f64>)>);

/// A camera and what it offers (`edge-ad cameras`).
#[derive(Debug, Clone)]
pub struct CameraInfo {
    /// Device node.
    pub path: PathBuf,
    /// Card name and driver.
    pub name: String,
    /// Formats: fourcc, description, sizes with their frame rates.
    pub formats: Vec<FormatInfo>,
    /// Settable controls: config name, range and default, e.g.
    /// `exposure_time_absolute 3..=2047 (default 250)`.
    pub controls: Vec<String>,
}

/// Every video-capture node and its formats (metadata nodes of UVC cameras are skipped).
pub fn list_cameras() -> Vec<CameraInfo> {
    let mut out = Vec::new();
    for node in v4l::context::enum_devices() {
        let Ok(dev) = Device::with_path(node.path()) else {
            continue;
        };
        let Ok(caps) = dev.query_caps() else { continue };
        if !caps
            .capabilities
            .contains(v4l::capability::Flags::VIDEO_CAPTURE)
        {
            continue;
        }
        let mut formats = Vec::new();
        for d in dev.enum_formats().unwrap_or_default() {
            let mut sizes = Vec::new();
            for s in dev.enum_framesizes(d.fourcc).unwrap_or_default() {
                if let v4l::framesize::FrameSizeEnum::Discrete(z) = s.size {
                    let fps = dev
                        .enum_frameintervals(d.fourcc, z.width, z.height)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|i| match &i.interval {
                            v4l::frameinterval::FrameIntervalEnum::Discrete(f)
                                if f.numerator > 0 =>
                            {
                                Some(f.denominator as f64 / f.numerator as f64)
                            }
                            _ => None,
                        })
                        .collect();
                    sizes.push((z.width, z.height, fps));
                }
            }
            formats.push((d.fourcc.to_string(), d.description.clone(), sizes));
        }
        let controls = query_controls(&dev)
            .unwrap_or_default()
            .iter()
            .filter(|d| d.typ != v4l::control::Type::CtrlClass)
            .map(|d| {
                format!(
                    "{} {}..={} (default {})",
                    control_key(&d.name),
                    d.minimum,
                    d.maximum,
                    d.default
                )
            })
            .collect();
        out.push(CameraInfo {
            path: node.path().to_path_buf(),
            name: format!("{} ({})", caps.card, caps.driver),
            formats,
            controls,
        });
    }
    out
}

/// The newest converted frame and when it was dequeued.
#[derive(Default)]
struct Latest {
    frame: Option<(Instant, Arc<Rgb8>)>,
    fault: Option<String>,
}

type Shared = Arc<(Mutex<Latest>, Condvar)>;

fn open(cfg: &CameraConfig) -> io::Result<(Device, v4l::Format)> {
    let dev = Device::with_path(&cfg.path)?;
    let want = v4l::Format::new(cfg.size.0, cfg.size.1, fourcc(cfg.format));
    let got = dev.set_format(&want)?;
    if (got.width, got.height, got.fourcc) != (want.width, want.height, want.fourcc) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: asked for {}×{} {}, the camera gives {}×{} {}",
                cfg.path.display(),
                want.width,
                want.height,
                want.fourcc,
                got.width,
                got.height,
                got.fourcc
            ),
        ));
    }
    dev.set_params(&v4l::video::capture::Parameters::with_fps(cfg.fps))?;
    apply_controls(&dev, cfg)?;
    Ok((dev, got))
}

fn stream_frames(cfg: &CameraConfig, shared: &Shared) -> io::Result<()> {
    let (dev, fmt) = open(cfg)?;
    let mut stream = MmapStream::with_buffers(&dev, Type::VideoCapture, 4)?;
    let period = Duration::from_secs_f64(1.0 / cfg.fps.max(1) as f64);
    stream.set_timeout((period * 3).max(Duration::from_millis(200)));
    let full_range = matches!(
        fmt.quantization,
        v4l::format::quantization::Quantization::FullRange
    );
    log::info!(
        "camera {} streaming {}×{} {}",
        cfg.path.display(),
        fmt.width,
        fmt.height,
        fmt.fourcc
    );
    let result = loop {
        let (buf, meta) = match stream.next() {
            Ok(x) => x,
            Err(e) => break Err(e),
        };
        if meta.flags.contains(v4l::buffer::Flags::ERROR) {
            log::warn!("camera: frame {} flagged ERROR, skipped", meta.sequence);
            continue;
        }
        let used = (meta.bytesused as usize).min(buf.len());
        let raw = RawFrame {
            format: cfg.format,
            width: fmt.width as usize,
            height: fmt.height as usize,
            stride: fmt.stride as usize,
            data: &buf[..used],
            full_range,
        };
        match to_rgb(&raw) {
            Ok(rgb) => {
                let (m, cv) = &**shared;
                if let Ok(mut l) = m.lock() {
                    l.frame = Some((Instant::now(), Arc::new(rgb)));
                    l.fault = None;
                }
                cv.notify_all();
            }
            Err(e) => log::warn!("camera: frame {}: {e}", meta.sequence),
        }
    };
    // Dropping a stream panics on STREAMOFF errors other than ENODEV (v4l 0.14): contain it.
    let _ = std::thread::spawn(move || drop(stream)).join();
    result
}

/// Start the capture thread for `cfg`; it reconnects forever.
fn start_capture(cfg: CameraConfig) -> Shared {
    let shared: Shared = Arc::default();
    let s = shared.clone();
    std::thread::Builder::new()
        .name("edge-ad-capture".into())
        .spawn(move || {
            let mut backoff = Duration::from_millis(100);
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            loop {
                let t = Instant::now();
                let e = stream_frames(&cfg, &s).err();
                let msg = e.map_or("stream ended".to_string(), |e| e.to_string());
                log::error!("camera {}: {msg}; reconnecting", cfg.path.display());
                if let Ok(mut l) = s.0.lock() {
                    l.fault = Some(msg);
                    l.frame = None;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                let jitter = 0.8 + 0.4 * ((seed >> 11) as f64 / (1u64 << 53) as f64);
                std::thread::sleep(backoff.mul_f64(jitter));
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
        .expect("spawn the capture thread");
    shared
}

/// The inspection stage on a camera: the first frame dequeued after the stage is asked (so never a
/// frame older than the trigger), within three frame periods; else a capture error.
pub struct CameraStage {
    judge: Judge,
    shared: Shared,
    wait: Duration,
    path: PathBuf,
}

impl CameraStage {
    /// Open the camera (capture starts at once) for `judge`.
    pub fn start(cfg: CameraConfig, judge: Judge) -> Self {
        let wait =
            Duration::from_secs_f64(3.0 / cfg.fps.max(1) as f64).max(Duration::from_millis(200));
        let path = cfg.path.clone();
        Self {
            judge,
            shared: start_capture(cfg),
            wait,
            path,
        }
    }

    /// The next frame after now, or why there is none.
    pub fn next_frame(&self) -> Result<Arc<Rgb8>, String> {
        let asked = Instant::now();
        let (m, cv) = &*self.shared;
        let mut l = m.lock().map_err(|_| "capture state poisoned".to_string())?;
        loop {
            if let Some(f) = &l.fault {
                return Err(f.clone());
            }
            if let Some((at, img)) = &l.frame {
                if *at >= asked {
                    return Ok(img.clone());
                }
            }
            let left = self.wait.saturating_sub(asked.elapsed());
            if left.is_zero() {
                return Err(format!("no frame within {} ms", self.wait.as_millis()));
            }
            l = cv
                .wait_timeout(l, left)
                .map_err(|_| "capture state poisoned".to_string())?
                .0;
        }
    }
}

impl Stage for CameraStage {
    fn inspect(&mut self, tag: u32, product: Option<usize>) -> StageResult {
        let img = self.next_frame().map_err(|e| {
            log::warn!("tag {tag}: capture: {e}");
            ErrCause::Capture
        })?;
        let path: &Path = &self.path;
        self.judge.judge(tag, product, &img, path)
    }

    /// The self-test scores a live frame (it used to only wait for one): up to 5 s for the
    /// camera to stream, then the frame through the model to a finite score.
    fn self_test(&mut self, product: usize) -> Result<(), u16> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let img = loop {
            match self.next_frame() {
                Ok(img) => break img,
                Err(e) if Instant::now() >= deadline => {
                    log::error!("self-test: camera: {e}");
                    return Err(crate::status::code::CAMERA_NOT_FOUND);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let path: &Path = &self.path;
        let r = self.judge.judge(0, Some(product), &img, path);
        super::arbiter::self_test_outcome(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v4l::control::{Description, Flags, Type, Value};

    fn desc(id: u32, typ: Type, name: &str, min: i64, max: i64) -> Description {
        Description {
            id,
            typ,
            name: name.into(),
            minimum: min,
            maximum: max,
            step: 1,
            default: min,
            flags: Flags::empty(),
            items: None,
        }
    }

    #[test]
    fn control_names_as_v4l2_ctl_prints_them() {
        assert_eq!(
            control_key("Exposure Time, Absolute"),
            "exposure_time_absolute"
        );
        assert_eq!(
            control_key("White Balance Temperature, Auto"),
            "white_balance_temperature_auto"
        );
        assert_eq!(control_key("  Gain (dB) "), "gain_db");
    }

    /// Known controls in a workable order (modes first), values checked against their ranges,
    /// unknown names answered with the camera's list.
    #[test]
    fn control_plan_checks_names_ranges_and_order() {
        let offered = [
            desc(1, Type::CtrlClass, "Camera Controls", 0, 0),
            desc(2, Type::Integer, "Exposure Time, Absolute", 3, 2047),
            desc(3, Type::Menu, "Auto Exposure", 0, 3),
            desc(4, Type::Boolean, "White Balance, Automatic", 0, 1),
        ];
        let wanted: BTreeMap<String, i64> = [
            ("exposure_time_absolute".to_string(), 200),
            ("auto_exposure".to_string(), 1),
            ("white_balance_automatic".to_string(), 0),
        ]
        .into();
        let plan = control_plan(&offered, &wanted).unwrap();
        let order: Vec<&str> = plan.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(
            order,
            [
                "auto_exposure",
                "white_balance_automatic",
                "exposure_time_absolute"
            ]
        );
        assert_eq!(plan[1].0.value, Value::Boolean(false));
        assert_eq!((plan[2].0.id, &plan[2].0.value), (2, &Value::Integer(200)));

        let e = control_plan(&offered, &[("gain".to_string(), 5)].into()).unwrap_err();
        assert!(
            e.contains("source.controls.gain")
                && e.contains("exposure_time_absolute, auto_exposure")
                && !e.contains("camera_controls"),
            "{e}"
        );
        let e = control_plan(
            &offered,
            &[("exposure_time_absolute".to_string(), 1)].into(),
        )
        .unwrap_err();
        assert!(e.contains("1 is outside 3..=2047"), "{e}");
        let e = control_plan(
            &offered,
            &[("white_balance_automatic".to_string(), 2)].into(),
        )
        .unwrap_err();
        assert!(e.contains("outside 0..=1"), "{e}");
    }
}
