//! `edge-ad`: the command-line shell over the edge-ad library. Every command is a thin user of
//! [`edge_ad::Pipeline`]; no stage of the pipeline lives here.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use edge_ad::bench::{self, BenchOptions};
use edge_ad::eval::{self, EvalOptions, EvalRow};
use edge_ad::heatmap::{self, Scale};
use edge_ad::images::list_images;
use edge_ad::inspector::{calibrate, CalibrateOptions, Inspector, LevelChoice};
use edge_ad::{Device, Fit, Pipeline, PipelineOptions, Rgb8};
use edge_ad_calibration::{Selection, ThresholdRule};
use edge_ad_kernels::BankDtype;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Line-side visual inspection: a frozen backbone, a bank of good parts, and a score per part.
#[derive(Parser, Debug)]
#[command(name = "edge-ad", version, about, long_about = None)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

/// Options that choose and load the model, shared by every command.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Model description (TOML), e.g. models/dinov2-s.toml.
    #[arg(long)]
    model: PathBuf,
    /// ONNX file, overriding the description's `onnx` path.
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// ADPretrain projector weights (safetensors with the authors' keys); without it frames are
    /// scored by FeatureNorm on the raw residuals.
    #[arg(long)]
    projector: Option<PathBuf>,
    /// Threads shared by the backbone and the kernels (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// How frames are fitted to the network input: crop | stretch | pad | tile (overrides the
    /// description).
    #[arg(long)]
    fit: Option<Fit>,
    /// Where residual search, projector and scoring run: cpu | cuda | auto (CUDA when usable, else CPU).
    #[arg(long, default_value = "auto")]
    device: Device,
}

impl ModelArgs {
    fn options(&self) -> PipelineOptions {
        PipelineOptions {
            model: self.model.clone(),
            onnx: self.onnx.clone(),
            projector: self.projector.clone(),
            threads: self.threads,
            fit: self.fit,
            device: self.device,
        }
    }
    fn load(&self) -> Result<Pipeline> {
        Pipeline::load(&self.options()).context("cannot load the model")
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Offline demo on the bundled model and images: calibrate on 4 good parts, inspect 11 test
    /// parts (3 good, 8 with scratches, spots, stains, cracks), print verdicts, write heatmaps.
    Demo(DemoArgs),
    /// Build a reference bank from good parts and set the decision threshold.
    ///
    /// Computes the features of every image of --images (the pool), chooses --refs references
    /// from it (--select: by default aligned — each frame gets the K pool images nearest it,
    /// the bank keeps the pool — where the pool's features fit 256 MB, else k-means over a global
    /// descriptor; or first, random; or exactly those of --refs-list), scores every other pool
    /// image against the bank and every reference against a bank chosen the same way without it
    /// (held-out scores; aligned: every image against references chosen without it), and sets the
    /// threshold from those scores: by default a 2 % false-reject budget with a guarantee (the
    /// conformal order statistic; needs 49 held-out images, fewer give their maximum and say
    /// which rate that states), or --reject-rate P, or another --rule. With --defects (a few
    /// known-bad parts) the threshold
    /// is placed between the classes and the separation reported. --levels chooses the scored
    /// levels (auto: from data). The bank is written atomically; a report (histogram, contact
    /// sheet, heatmaps, summary) goes next to it.
    Calibrate(CalibrateArgs),
    /// Score images against a bank: path, score, verdict (OK/NG) and time per stage.
    ///
    /// Directories are walked recursively (sorted, image files only). An image that cannot be read
    /// is reported as ERR and the command exits with status 2 after the others.
    Inspect(InspectArgs),
    /// Image AUROC, pixel AUROC, AUPRO (FPR ≤ 0.3) and F1-max on an MVTec-layout data set.
    ///
    /// --data holds train/good (the reference pool), test/<type> (good and defect types) and
    /// ground_truth/<type>/<stem>_mask.png. Every combination of --fit, --select and --levels
    /// (each a comma-separated list; --levels sets separated by `;`) is evaluated, features
    /// computed once per framing. Prints a table (or --json, one object per combination).
    ///
    /// The line's view of each combination: the threshold calibrate would set from train/good
    /// (same held-out scores, same rule: the default or --rule / --reject-rate), with the false
    /// rejects (FR) and escapes (defects passed) it gives on test/; and the escapes when at most
    /// 1 % and 5 % of the test goods may be rejected (esc@1%, esc@5%: the threshold read off the
    /// test goods, what the ranking allows).
    Eval(EvalArgs),
    /// The line daemon: triggers in, verdicts out (Modbus TCP/RTU, serial ASCII, result log),
    /// fail-safe: a part is passed only when it was inspected OK within its deadline.
    ///
    /// Loads the model and bank named in --config, opens the configured I/O, self-tests on the
    /// first source frame, then inspects every trigger. SIGTERM/SIGINT drain the parts in flight
    /// (each still gets a verdict) and exit 0. docs/line.md documents the config, the states and
    /// the Modbus register map.
    Run(RunArgs),
    /// Check that the line config's GPIO header pins are muxed as GPIO (JetPack 6; needs root).
    ///
    /// Reads each header pin's pad control (PADCTL) register through /dev/mem: an output must be
    /// GPIO with its driver on, the trigger input GPIO with its input buffer on. A pin that is
    /// not gets an E_PINMUX message saying how to fix it. The report (JSON, written atomically)
    /// is what the unprivileged `edge-ad run` reads in its self-test: the systemd unit runs this
    /// as its privileged ExecStartPre. Exit 1 when a pin is not muxed for its use.
    PinmuxCheck(PinmuxCheckArgs),
    /// Print an example line config for a board profile (its default header pins, a camera,
    /// Modbus TCP): a start for /etc/edge-ad/line.toml.
    ExampleConfig(ExampleConfigArgs),
    /// List the V4L2 capture devices with their pixel formats, sizes and frame rates.
    Cameras,
    /// List the NG archive of a line (`[archive] dir`): newest first, one part a line (time,
    /// tag, product, verdict, score against threshold, the entry's folder).
    ///
    /// Each entry holds the frame (frame.jpg), the heatmap drawn over it (heatmap.jpg) and the
    /// record (record.json: tag, product, time, score, threshold, verdict, cause, timings).
    Archive(ArchiveArgs),
    /// Time the pipeline per stage on real images and compare the kernels with this machine's SGEMM.
    ///
    /// The first --refs images of --images (sorted) build the bank; the others are cycled as
    /// frames. Prints medians over at least 20 frames after warm-up.
    Bench(BenchArgs),
}

/// Arguments of `edge-ad demo`.
#[derive(Args, Debug)]
struct DemoArgs {
    /// Folder for the bank and the heatmaps.
    #[arg(long, default_value = "edge-ad-demo")]
    out: PathBuf,
    /// Bundled demo folder (default: found next to the binary or in the source tree).
    #[arg(long)]
    demo_dir: Option<PathBuf>,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where residual search, projector and scoring run: cpu | cuda | auto.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// One JSON object per part (full-precision score), then a summary object.
    #[arg(long)]
    json: bool,
}

/// Arguments of `edge-ad calibrate`.
#[derive(Args, Debug)]
struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Reference images in the bank.
    #[arg(long, default_value_t = 8)]
    refs: usize,
    /// File listing the exact reference images, one path per line (relative to the file); the
    /// list says how many and which, so --refs and --select beside it are refused.
    #[arg(long, conflicts_with_all = ["refs", "select"])]
    refs_list: Option<PathBuf>,
    /// Reference selection from the pool: aligned (the K pool images nearest each frame, chosen
    /// at inspection; the bank file keeps the whole pool) | kmeans | first | random. Default:
    /// aligned when the pool's features take at most 256 MB in f16, else kmeans.
    #[arg(long)]
    select: Option<Selection>,
    /// Seed of random / k-means selection and of synthetic defects.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Levels scored: model (the description's score.levels) | all | auto | a list like 2,3.
    #[arg(long, default_value = "model")]
    levels: LevelChoice,
    /// Folder of known-bad parts: the threshold goes between the classes.
    #[arg(long)]
    defects: Option<PathBuf>,
    #[command(flatten)]
    threshold: RuleArgs,
    /// Folder for the calibration report (default: the bank's path with `.report`).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Folder of normal (good) images, walked recursively.
    #[arg(long, required_unless_present = "product", conflicts_with = "product")]
    images: Option<PathBuf>,
    /// Several products in one bank file: NAME=DIR, repeated (DIR: that product's good parts).
    /// Each product is calibrated as with --images (its own references and threshold; --refs,
    /// --select, --seed, --levels, the rule and --bank-dtype apply to each); the bank holds them
    /// all and the line recognises the product per frame, numbering them in this order.
    /// Reports go to OUT.NAME.report.
    #[arg(long, value_name = "NAME=DIR", conflicts_with_all = ["report", "refs_list", "defects"])]
    product: Vec<String>,
    /// Bank file to write.
    #[arg(long)]
    out: PathBuf,
    /// Bank precision: f16 (default) or f32.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    bank_dtype: BankDtype,
}

/// How the threshold is set from the held-out good scores (calibrate, and eval's operating
/// point).
#[derive(Args, Debug)]
struct RuleArgs {
    /// Threshold rule: conformal:P (the default, P = 0.02) | max*MARGIN | mean+Ksigma |
    /// quantile:BUDGET (e.g. quantile:0.01).
    #[arg(long, conflicts_with_all = ["margin", "sigma"])]
    rule: Option<ThresholdRule>,
    /// Threshold = max normal score × MARGIN.
    #[arg(long, conflicts_with = "sigma")]
    margin: Option<f64>,
    /// Threshold = mean + SIGMA × standard deviation of the normal scores.
    #[arg(long)]
    sigma: Option<f64>,
    /// False-reject budget P in (0, 0.5): the threshold is the ⌈(n+1)(1−P)⌉-th smallest of the
    /// n held-out good scores (split conformal prediction), so a new good part is rejected with
    /// probability at most P; needs n ≥ ⌈1/P⌉ − 1 (49 for 0.02). Same as --rule conformal:P.
    /// Without any rule: 0.02, or the largest held-out score when the pool is too small for it.
    #[arg(long, allow_negative_numbers = true, conflicts_with_all = ["margin", "sigma", "rule"])]
    reject_rate: Option<f64>,
}

impl RuleArgs {
    /// The rule asked for (`None`: the default), refused before any work when no pool can
    /// apply it.
    fn resolve(self) -> Result<Option<ThresholdRule>> {
        let rule = match (self.rule, self.margin, self.sigma, self.reject_rate) {
            (_, _, _, Some(p)) => Some(ThresholdRule::Conformal { reject_rate: p }),
            (Some(r), _, _, None) => Some(r),
            (None, _, Some(k), None) => Some(ThresholdRule::MeanPlusKSigma { k }),
            (None, Some(m), None, None) => Some(ThresholdRule::MaxTimesMargin { margin: m }),
            (None, None, None, None) => None,
        };
        if let Some(r) = rule {
            r.validate().map_err(anyhow::Error::msg)?;
        }
        Ok(rule)
    }
}

/// Arguments of `edge-ad inspect`.
#[derive(Args, Debug)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Bank file from `edge-ad calibrate`.
    #[arg(long)]
    bank: PathBuf,
    /// One JSON object per image per line.
    #[arg(long)]
    json: bool,
    /// Write `<stem>.png`: the frame with the anomaly map over it and the score.
    #[arg(long)]
    heatmap: Option<PathBuf>,
    /// Write `<stem>.safetensors` with `map` (H×W f32) and `score`.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Images or folders.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

/// Arguments of `edge-ad eval`.
#[derive(Args, Debug)]
struct EvalArgs {
    /// Model description (TOML).
    #[arg(long)]
    model: PathBuf,
    /// ONNX file, overriding the description's.
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// ADPretrain projector weights (safetensors).
    #[arg(long)]
    projector: Option<PathBuf>,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where residual search, projector and scoring run: cpu | cuda | auto.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// References per bank.
    #[arg(long, default_value_t = 8)]
    refs: usize,
    /// Data set root.
    #[arg(long, required_unless_present = "product", conflicts_with = "product")]
    data: Option<PathBuf>,
    /// Several products (NAME=DATA, repeated; DATA holds train/good or good/, and test/<type>):
    /// each is calibrated as `calibrate --product` does, and every test image is inspected with
    /// its own bank and through recognition among all products. Prints, per product, the
    /// recognition (right, taken for another product, none), the image AUROC of the separate
    /// bank and of the unified bank set, and false rejects / escapes at calibrate's threshold.
    /// Uses the first --select and --levels.
    #[arg(long, value_name = "NAME=DATA", conflicts_with = "per_type")]
    product: Vec<String>,
    /// Framings, comma-separated (default: the description's).
    #[arg(long, value_delimiter = ',')]
    fit: Vec<Fit>,
    /// Reference selections, comma-separated (default: aligned, calibrate's default; with
    /// --bank-dtype f32 pass kmeans, first or random: aligned pools are kept in f16; with
    /// --product, one value, default as calibrate's).
    #[arg(long, value_delimiter = ',')]
    select: Vec<Selection>,
    /// Level sets separated by `;`: model | all | auto | a list like 2,3.
    #[arg(long, value_delimiter = ';', default_value = "model")]
    levels: Vec<LevelChoice>,
    /// Seed of random / k-means selection.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Bank precision: f16 (default) or f32.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    bank_dtype: BankDtype,
    /// The threshold rule of the operating-point columns (as calibrate's).
    #[command(flatten)]
    threshold: RuleArgs,
    /// One JSON object per combination instead of a table.
    #[arg(long)]
    json: bool,
    /// Also print per-defect-type rows.
    #[arg(long)]
    per_type: bool,
}

/// Arguments of `edge-ad run`.
#[derive(Args, Debug)]
struct RunArgs {
    /// Line config (TOML), e.g. examples/line-demo.toml.
    #[arg(long)]
    config: PathBuf,
}

/// Arguments of `edge-ad pinmux-check`.
#[derive(Args, Debug)]
struct PinmuxCheckArgs {
    /// Line config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Report to write.
    #[arg(long, default_value = edge_ad_line::pinmux::DEFAULT_REPORT)]
    out: PathBuf,
    /// Physical memory device (a file in tests).
    #[arg(long, default_value = "/dev/mem", hide = true)]
    mem: PathBuf,
}

/// Arguments of `edge-ad example-config`.
#[derive(Args, Debug)]
struct ExampleConfigArgs {
    /// Board profile: orin-nano, orin-nx, agx-orin, xavier-nx, agx-xavier, x86-nvidia,
    /// cpu-only.
    #[arg(long)]
    board: String,
}

/// Arguments of `edge-ad archive`.
#[derive(Args, Debug)]
struct ArchiveArgs {
    /// The archive folder (`[archive] dir` of the line config).
    dir: PathBuf,
    /// Only parts with this verdict: OK | NG | ERR.
    #[arg(long)]
    verdict: Option<String>,
    /// Only parts of this product (its id or its name).
    #[arg(long)]
    product: Option<String>,
    /// At most this many entries (the newest).
    #[arg(long)]
    limit: Option<usize>,
    /// One JSON object per entry (its record plus `path`).
    #[arg(long)]
    json: bool,
}

/// Arguments of `edge-ad bench`.
#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Reference images in the bank.
    #[arg(long, default_value_t = 8)]
    refs: usize,
    /// Time a calibrated bank instead (any selection, aligned included; its scored levels),
    /// inspecting every image of --images the way the line does: stage medians with the
    /// per-frame reference choice (align), the bank file's size and the process's peak memory.
    #[arg(long, conflicts_with_all = ["refs", "bank_dtype"])]
    bank: Option<PathBuf>,
    /// Folder of images (walked recursively).
    #[arg(long)]
    images: PathBuf,
    /// Timed frames (at least 20).
    #[arg(long, default_value_t = 20)]
    frames: usize,
    /// Untimed warm-up frames.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Bank precision: f16 (default) or f32.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    bank_dtype: BankDtype,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_dtype(s: &str) -> Result<BankDtype, String> {
    match s {
        "f16" => Ok(BankDtype::F16),
        "f32" => Ok(BankDtype::F32),
        other => Err(format!("`{other}`: expected f16 or f32")),
    }
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`edge-ad inspect … | head`) like other Unix tools, instead of
    // Rust's default of ignoring SIGPIPE and panicking in println!.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let log = QueuedStderr::start();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&cli.log))
        .target(env_logger::Target::Pipe(Box::new(log.clone())))
        .init();
    let r = run(cli);
    log.flush_for(std::time::Duration::from_secs(1));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain, each cause once: a library error that already says its cause (an I/O
            // error with its path) would otherwise repeat the OS's words.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("edge-ad: error: {msg}");
            ExitCode::from(2)
        }
    }
}

/// The log's writer: records go to stderr from a thread of their own through a bounded queue,
/// so a stalled journal (stderr is journald's pipe under systemd) never blocks a thread that
/// logs — the line's arbiter included. When the queue is full, records are dropped and counted
/// (the count is written once stderr moves again).
#[derive(Clone)]
struct QueuedStderr {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl QueuedStderr {
    fn start() -> Self {
        use std::sync::atomic::Ordering;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1024);
        let q = Self {
            tx,
            dropped: Default::default(),
            written: Default::default(),
            sent: Default::default(),
        };
        let (dropped, written) = (q.dropped.clone(), q.written.clone());
        std::thread::Builder::new()
            .name("edge-ad-log".into())
            .spawn(move || {
                let mut err = std::io::stderr();
                let mut reported = 0;
                while let Ok(rec) = rx.recv() {
                    let d = dropped.load(Ordering::Relaxed);
                    if d > reported {
                        let _ = writeln!(
                            err,
                            "[edge-ad] {} log records dropped (stderr stalled)",
                            d - reported
                        );
                        reported = d;
                    }
                    let _ = err.write_all(&rec);
                    written.fetch_add(1, Ordering::Release);
                }
            })
            .expect("spawn the log thread");
        q
    }

    /// Wait until what was queued is written, at most `limit`.
    fn flush_for(&self, limit: std::time::Duration) {
        use std::sync::atomic::Ordering;
        let t = std::time::Instant::now();
        while self.written.load(Ordering::Acquire) < self.sent.load(Ordering::Relaxed)
            && t.elapsed() < limit
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

impl Write for QueuedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        match self.tx.try_send(buf.to_vec()) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A one-line progress indicator on stderr, only when stderr is a terminal.
fn progress_line() -> impl FnMut(&str, usize, usize) {
    let tty = std::io::stderr().is_terminal();
    move |what: &str, done: usize, total: usize| {
        if tty {
            let width = 30;
            let filled = (done * width)
                .checked_div(total)
                .unwrap_or(width)
                .min(width);
            eprint!(
                "\r{what:<24} [{}{}] {done}/{total}",
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
            if done == total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        }
    }
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(args) => cmd_demo(args),
        Command::Calibrate(args) => cmd_calibrate(args),
        Command::Inspect(args) => cmd_inspect(args),
        Command::Cameras => {
            cmd_cameras();
            Ok(())
        }
        Command::ExampleConfig(args) => cmd_example_config(args),
        Command::PinmuxCheck(args) => cmd_pinmux_check(args),
        Command::Run(args) => cmd_run(args),
        Command::Archive(args) => cmd_archive(args),
        Command::Eval(args) => cmd_eval(args),
        Command::Bench(args) => cmd_bench(args),
    }
}

fn cmd_demo(args: DemoArgs) -> Result<()> {
    let DemoArgs {
        out,
        demo_dir,
        threads,
        device,
        json,
    } = args;
    let dir = match demo_dir {
        Some(d) => d,
        None => edge_ad::demo::find_demo_dir()
            .context("bundled demo not found (set --demo-dir or EDGE_AD_DEMO_DIR)")?,
    };
    let dir = std::fs::canonicalize(&dir).with_context(|| format!("{}", dir.display()))?;
    let good = dir.join("images/good");
    if !json {
        println!(
            "edge-ad demo: calibrating on {} good parts of {}",
            edge_ad::demo::DEMO_REFS,
            good.display()
        );
    }
    let summary = edge_ad::demo::run_demo(&dir, &out, threads, device, |p| {
        let shown = p.path.strip_prefix(&dir).unwrap_or(&p.path);
        if json {
            let line = serde_json::json!({
                "image": shown, "score": p.score, "verdict": p.verdict.to_string(),
                "expected": p.expected.to_string(), "ms": p.ms,
            });
            println!("{line}");
            return;
        }
        let mark = if p.verdict == p.expected {
            ""
        } else {
            "   <-- expected "
        };
        let exp = if p.verdict == p.expected {
            String::new()
        } else {
            p.expected.to_string()
        };
        println!(
            "{:<36} score {:>7.3}  {}  {:>5.1} ms{mark}{exp}",
            shown.display(),
            p.score,
            p.verdict,
            p.ms
        );
    })?;
    let ng = summary
        .parts
        .iter()
        .filter(|p| p.verdict == edge_ad::inspector::Verdict::Ng)
        .count();
    if json {
        let line = serde_json::json!({
            "demo": dir, "parts": summary.parts.len(), "ng": ng,
            "threshold": summary.threshold, "correct": summary.correct(),
            "bank": summary.bank,
        });
        println!("{line}");
        return Ok(());
    }
    println!(
        "{} parts: {} OK, {} NG (threshold {:.3}); {}/{} verdicts match the parts' folders",
        summary.parts.len(),
        summary.parts.len() - ng,
        ng,
        summary.threshold,
        summary.correct(),
        summary.parts.len()
    );
    println!(
        "bank: {}   heatmaps: {}",
        summary.bank.display(),
        summary.heatmaps.display()
    );
    Ok(())
}

fn cmd_calibrate(args: CalibrateArgs) -> Result<()> {
    let CalibrateArgs {
        model,
        refs,
        refs_list,
        select,
        seed,
        levels,
        defects,
        threshold,
        report: report_dir,
        images,
        product,
        out,
        bank_dtype,
    } = args;
    let rule = threshold.resolve()?;
    let products = product
        .iter()
        .map(|p| parse_product(p))
        .collect::<Result<Vec<_>>>()?;
    for (i, (n, _)) in products.iter().enumerate() {
        if products[..i].iter().any(|(m, _)| m == n) {
            anyhow::bail!("--product {n}=…: the name {n} is given twice");
        }
    }
    // Fail before the long work if the bank cannot be written there.
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!("{}: folder {} does not exist", out.display(), dir.display());
    }
    let mut pipeline = model.load()?;
    let mut opts = CalibrateOptions {
        images: images.clone().unwrap_or_default(),
        refs,
        refs_list,
        select,
        seed,
        levels,
        defects,
        bank_dtype,
        rule,
    };
    if !products.is_empty() {
        return calibrate_products(&mut pipeline, &mut opts, &products, &out);
    }
    let rdir = report_dir.unwrap_or_else(|| {
        let mut p = out.clone().into_os_string();
        p.push(".report");
        PathBuf::from(p)
    });
    // The report replaces an earlier report there, never anything else (before the long work).
    edge_ad::report::check_report_dir(&rdir)?;
    let (file, report) = calibrate(&mut pipeline, &opts, progress_line())?;
    let summary = edge_ad::report::summary(&file.header, &report);
    print!("{summary}");
    edge_ad::report::save_with_bank(&file, &out, &rdir, &report, &summary)
        .context("cannot write the bank and its calibration report")?;
    println!("bank written: {} ({})", out.display(), bank_dtype.name());
    println!("report: {}", rdir.display());
    Ok(())
}

/// `--product NAME=DIR`: a product name as the line takes it, and an existing folder.
fn parse_product(arg: &str) -> Result<(String, PathBuf)> {
    let Some((name, dir)) = arg.split_once('=') else {
        anyhow::bail!("--product {arg}: expected NAME=DIR");
    };
    if !edge_ad_calibration::bankset::valid_product_name(name) {
        anyhow::bail!(
            "--product {arg}: the name {name:?} must be 1–32 letters, digits, '-', '_' or '.'"
        );
    }
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        anyhow::bail!("--product {arg}: {} is not a folder", dir.display());
    }
    Ok((name.to_string(), dir))
}

/// `calibrate --product …`: each product calibrated in turn, then one bank set and a report per
/// product (`OUT.NAME.report`) written together.
fn calibrate_products(
    pipeline: &mut Pipeline,
    opts: &mut CalibrateOptions,
    products: &[(String, PathBuf)],
    out: &Path,
) -> Result<()> {
    let report_of = |name: &str| {
        let mut p = out.as_os_str().to_owned();
        p.push(format!(".{name}.report"));
        PathBuf::from(p)
    };
    for (name, _) in products {
        edge_ad::report::check_report_dir(&report_of(name))?;
    }
    let mut done = Vec::with_capacity(products.len());
    for (name, dir) in products {
        println!("product {name}: {}", dir.display());
        opts.images = dir.clone();
        let (file, report) = calibrate(pipeline, opts, progress_line())
            .with_context(|| format!("product {name}"))?;
        let summary = edge_ad::report::summary(&file.header, &report);
        print!("{summary}");
        done.push((name.clone(), file, report, summary));
    }
    // Each product must be recognisable (two or more reference images on a level all share),
    // else the set could not be used: refused before anything is written.
    if done.len() > 1 {
        let files: Vec<&edge_ad_calibration::BankFile> = done.iter().map(|d| &d.1).collect();
        let level = edge_ad::recognise::common_level(&files)
            .context("the products' banks share no level: calibrate them with the same --levels")?;
        for (name, file, ..) in &done {
            edge_ad::recognise::Signature::of(file, level)
                .with_context(|| format!("product {name}: cannot be recognised"))?;
        }
    }
    let set = edge_ad_calibration::BankSet {
        products: done
            .iter()
            .map(|(n, f, ..)| (n.clone(), f.clone()))
            .collect(),
    };
    let dirs: Vec<PathBuf> = done.iter().map(|(n, ..)| report_of(n)).collect();
    let parts: Vec<edge_ad::report::ReportParts<'_>> = done
        .iter()
        .zip(&dirs)
        .map(|((_, f, r, s), d)| (d.as_path(), &f.header, r, s.as_str()))
        .collect();
    edge_ad::report::save_with_set(&set, out, &parts)
        .context("cannot write the bank set and its reports")?;
    println!(
        "bank set written: {} ({} products: {})",
        out.display(),
        products.len(),
        products
            .iter()
            .map(|p| p.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for d in &dirs {
        println!("report: {}", d.display());
    }
    Ok(())
}

fn cmd_inspect(args: InspectArgs) -> Result<()> {
    let InspectArgs {
        model,
        bank,
        json,
        heatmap: heat_dir,
        dump,
        inputs,
    } = args;
    let mut inspector = Inspector::load(&model.options(), &bank).context("cannot load the bank")?;
    for d in heat_dir.iter().chain(dump.iter()) {
        std::fs::create_dir_all(d)
            .with_context(|| format!("{}: cannot create the folder", d.display()))?;
    }
    let mut files = Vec::new();
    for i in &inputs {
        files.extend(list_images(i)?);
    }
    if files.is_empty() {
        anyhow::bail!(
            "no image files in {}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // A bank set: the product is recognised per image and printed with it.
    let names: Option<Vec<String>> = inspector.product_names().map(<[String]>::to_vec);
    let auto = inspector.bank_count() > 1;
    let mut failures = 0usize;
    let stdout = std::io::stdout();
    for path in &files {
        let result = Rgb8::open(path)
            .map_err(anyhow::Error::from)
            .and_then(|img| {
                if !auto {
                    let (insp, verdict) = inspector.inspect(&img, path)?;
                    return Ok((img, insp, verdict, 0));
                }
                match inspector.inspect_auto(&img, path)? {
                    (rec, Some((insp, verdict))) => Ok((img, insp, verdict, rec.bank.unwrap_or(0))),
                    (rec, None) => anyhow::bail!(
                        "matches no product of the bank set (cosine distances {})",
                        rec.distances
                            .iter()
                            .map(|d| format!("{d:.3}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            });
        let mut out = stdout.lock();
        match result {
            Ok((img, insp, verdict, bank)) => {
                let t = insp.timings;
                let th = inspector
                    .header_of(bank)
                    .unwrap_or(inspector.header())
                    .threshold
                    .clone();
                let scale = Scale::for_threshold(th.normal_min, th.value);
                let product = names.as_ref().and_then(|n| n.get(bank));
                if json {
                    let mut line = serde_json::json!({
                        "path": path, "score": insp.score, "verdict": verdict,
                        "threshold": th.value, "ms": t.total_ms, "timings": t,
                    });
                    if let Some(p) = product {
                        line["product"] = serde_json::json!(p);
                    }
                    writeln!(out, "{line}")?;
                } else {
                    let product = product.map(|p| format!("  [{p}]")).unwrap_or_default();
                    writeln!(
                            out,
                            "{}{product}  score {:.4}  {}  {:.1} ms (pre {:.1}, backbone {:.1} for {} pass{}, align {:.1}, residual {:.1}, projector {:.1}, score {:.1})",
                            path.display(), insp.score, verdict, t.total_ms, t.preprocess_ms, t.backbone_ms,
                            t.tiles, if t.tiles == 1 { "" } else { "es" }, t.align_ms,
                            t.residual_ms, t.projector_ms, t.score_ms
                        )?;
                }
                if let Some(d) = &heat_dir {
                    let label = format!("{:.3} {verdict}", insp.score);
                    let png = heatmap::render(&img, &insp, scale, &label);
                    let p = d.join(format!("{}.png", stem(path)));
                    edge_ad::report::save_png(&png, &p).context("cannot write the heatmap")?;
                }
                if let Some(d) = &dump {
                    let p = d.join(format!("{}.safetensors", stem(path)));
                    heatmap::write_dump(&p, &insp)?;
                }
            }
            Err(e) => {
                failures += 1;
                if json {
                    let line = serde_json::json!({"path": path, "verdict": "ERR", "error": format!("{e:#}")});
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{}  ERR  {e:#}", path.display())?;
                }
            }
        }
    }
    if failures > 0 {
        anyhow::bail!(
            "{failures} of {} images could not be inspected",
            files.len()
        );
    }
    Ok(())
}

fn cmd_eval(args: EvalArgs) -> Result<()> {
    let EvalArgs {
        model,
        onnx,
        projector,
        threads,
        device,
        refs,
        data,
        fit,
        select,
        levels,
        seed,
        bank_dtype,
        threshold,
        json,
        per_type,
        product,
    } = args;
    let rule = threshold.resolve()?;
    if !product.is_empty() {
        let products = product
            .iter()
            .map(|p| parse_product(p))
            .collect::<Result<Vec<_>>>()?;
        for (i, (n, _)) in products.iter().enumerate() {
            if products[..i].iter().any(|(m, _)| m == n) {
                anyhow::bail!("--product {n}=…: the name {n} is given twice");
            }
        }
        if products.len() < 2 {
            anyhow::bail!("--product: give at least two products to compare");
        }
        for (flag, n) in [
            ("--fit", fit.len()),
            ("--select", select.len()),
            ("--levels", levels.len()),
        ] {
            if n > 1 {
                anyhow::bail!("{flag}: one value with --product (each product is calibrated once)");
            }
        }
        let opts = PipelineOptions {
            model,
            onnx,
            projector,
            threads,
            fit: fit.first().copied(),
            device,
        };
        let co = CalibrateOptions {
            images: PathBuf::new(),
            refs,
            refs_list: None,
            select: select.first().copied(),
            seed,
            levels: levels.first().cloned().unwrap_or(LevelChoice::Model),
            defects: None,
            bank_dtype,
            rule,
        };
        let rows = eval::products(Pipeline::load(&opts)?, &products, &co, progress_line())?;
        let mut out = std::io::stdout().lock();
        if !json {
            writeln!(
                out,
                "{:<12} {:>5} {:>6} {:>10} {:>5} {:>5} {:>9} {:>9} {:>10} {:>10}",
                "product",
                "good",
                "defect",
                "recognised",
                "other",
                "none",
                "AUROC-sep",
                "AUROC-set",
                "FR/esc-sep",
                "FR/esc-set"
            )?;
        }
        let f = |a: Option<f64>| a.map_or("-".into(), |v| format!("{v:.3}"));
        for r in &rows {
            if json {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            } else {
                writeln!(
                    out,
                    "{:<12} {:>5} {:>6} {:>10} {:>5} {:>5} {:>9} {:>9} {:>10} {:>10}",
                    r.product,
                    r.good,
                    r.defective,
                    format!("{}/{}", r.recognised, r.good + r.defective),
                    r.confused,
                    r.unrecognised,
                    f(r.auroc_separate),
                    f(r.auroc_unified),
                    format!("{}/{}", r.verdicts_separate.0, r.verdicts_separate.1),
                    format!("{}/{}", r.verdicts_unified.0, r.verdicts_unified.1),
                )?;
            }
        }
        return Ok(());
    }
    let data = data.context("--data is required without --product")?;
    let select = if select.is_empty() {
        vec![Selection::Aligned]
    } else {
        select
    };
    let base = PipelineOptions {
        model,
        onnx,
        projector,
        threads,
        fit: None,
        device,
    };
    let fits = if fit.is_empty() {
        vec![edge_ad::ModelDescription::load(&base.model)?.desc.input.fit]
    } else {
        fit
    };
    let eo = EvalOptions {
        data,
        refs,
        fits,
        selections: select,
        levels,
        seed,
        bank_dtype,
        rule,
    };
    if !json {
        println!(
            "{:<12} {:<7} {:<10} {:>5} {:>7} {:>7} {:>7} {:>7} {:>9} {:>6} {:>6} {:>6} {:>6}",
            "fit",
            "select",
            "levels",
            "tiles",
            "I-AUROC",
            "P-AUROC",
            "AUPRO",
            "I-F1max",
            "threshold",
            "FR",
            "escape",
            "esc@1%",
            "esc@5%"
        );
    }
    let print_row = |r: &EvalRow| {
        if json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
            return;
        }
        let lv = r
            .levels
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let line = |name: &str, m: &eval::Metrics, op: &str| {
            println!(
                "{:<12} {:<7} {:<10} {:>5.2} {:>7.3} {:>7.3} {:>7.3} {:>7.3}{op}",
                name,
                r.selection,
                lv,
                r.tiles_per_frame,
                m.image_auroc,
                m.pixel_auroc,
                m.aupro,
                m.image_f1_max
            )
        };
        let o = &r.operating;
        let ratio = |p: &Option<edge_ad_calibration::metrics::OperatingPoint>, fr: bool| {
            p.map_or("–".to_string(), |p| {
                if fr {
                    format!("{}/{}", p.false_rejects, p.good)
                } else {
                    format!("{}/{}", p.escapes, p.defective)
                }
            })
        };
        let op = format!(
            " {:>9} {:>6} {:>6} {:>6} {:>6}",
            o.calibrated
                .map_or("–".to_string(), |p| format!("{:.4}", p.threshold)),
            ratio(&o.calibrated, true),
            ratio(&o.calibrated, false),
            ratio(&o.at_1pct_false_rejects, false),
            ratio(&o.at_5pct_false_rejects, false)
        );
        line(&r.fit, &r.overall, &op);
        match (&o.error, &o.note) {
            (Some(e), _) => println!("  operating point: {e}"),
            (None, note) => println!(
                "  threshold by {} on {} held-out good images of train/good{}{}",
                o.rule,
                o.held_out,
                o.expected_false_reject.map_or(String::new(), |p| format!(
                    ", stated false-reject rate {:.2} %",
                    100.0 * p
                )),
                note.as_ref().map_or(String::new(), |n| format!(" ({n})"))
            ),
        }
        if per_type {
            for (k, m) in &r.per_type {
                line(&format!("  {k}"), m, "");
            }
        }
    };
    eval::evaluate(&base, &eo, progress_line(), print_row)?;
    Ok(())
}

fn cmd_run(args: RunArgs) -> Result<()> {
    let RunArgs { config } = args;
    let c = edge_ad_line::daemon::run(&config)?;
    println!(
        "edge-ad run: {} triggers: {} OK, {} NG, {} ERR ({} overruns, {} late verdicts dropped)",
        c.triggers, c.ok, c.ng, c.faults, c.overruns, c.late_results
    );
    Ok(())
}

fn cmd_pinmux_check(args: PinmuxCheckArgs) -> Result<()> {
    let PinmuxCheckArgs { config, out, mem } = args;
    use edge_ad_line::{config::LineConfig, pinmux};
    let (cfg, bytes) = LineConfig::load(&config)?;
    let board = cfg.board_profile(&config)?;
    let report = pinmux::check(&cfg, &bytes, board.as_ref(), &mem)?;
    pinmux::write_report(&out, &report)?;
    for p in &report.pins {
        if p.error.is_none() {
            println!(
                "header pin {} ({}, {} line {}): PADCTL {} = {}: GPIO {}, ok",
                p.pin, p.port, p.chip, p.line, p.padctl, p.value, p.direction
            );
        }
    }
    for u in &report.unchecked {
        println!("not checked: {u}");
    }
    if report.pins.is_empty() && report.unchecked.is_empty() {
        println!("no GPIO pins in {}: nothing to check", config.display());
    }
    let errors = report.errors();
    for e in &errors {
        eprintln!("{e}");
    }
    println!("report: {}", out.display());
    if !errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn cmd_example_config(args: ExampleConfigArgs) -> Result<()> {
    let ExampleConfigArgs { board } = args;
    let profile = edge_ad_boards::profile(&board)?;
    print!("{}", edge_ad_line::config::example(&profile));
    Ok(())
}

fn cmd_archive(args: ArchiveArgs) -> Result<()> {
    let ArchiveArgs {
        dir,
        verdict,
        product,
        limit,
        json,
    } = args;
    let verdict = verdict
        .map(|v| match v.to_ascii_uppercase().as_str() {
            w @ ("OK" | "NG" | "ERR") => Ok(w.to_string()),
            _ => anyhow::bail!("--verdict {v}: expected OK, NG or ERR"),
        })
        .transpose()?;
    if !dir.is_dir() {
        anyhow::bail!("{}: no such archive folder", dir.display());
    }
    let (entries, bad) = edge_ad_line::archive::list(&dir)
        .with_context(|| format!("cannot read the archive {}", dir.display()))?;
    for (p, why) in &bad {
        eprintln!(
            "warning: {}: unreadable record ({why}); skipped",
            p.display()
        );
    }
    let chosen = entries
        .iter()
        .filter(|e| verdict.as_deref().is_none_or(|v| e.verdict() == v))
        .filter(|e| {
            product.as_deref().is_none_or(|p| {
                let (id, name) = e.product();
                p == name || p.parse::<u64>().is_ok_and(|n| n == id)
            })
        })
        .take(limit.unwrap_or(usize::MAX));
    let mut out = std::io::stdout().lock();
    let mut n = 0;
    for e in chosen {
        n += 1;
        let r = &e.record;
        if json {
            let mut v = r.clone();
            if let Some(o) = v.as_object_mut() {
                o.insert("path".into(), serde_json::json!(e.path));
            }
            writeln!(out, "{v}")?;
        } else {
            let (id, name) = e.product();
            let num = |k: &str| r[k].as_f64().map_or("-".to_string(), |x| format!("{x:.4}"));
            writeln!(
                out,
                "{}  tag {:>6}  product {id} {name:<12} {:<3}  score {} / {}  {}",
                r["time"].as_str().unwrap_or("?"),
                r["tag"].as_u64().unwrap_or(0),
                e.verdict(),
                num("score"),
                num("threshold"),
                e.path.display()
            )?;
        }
    }
    if !json {
        writeln!(out, "{n} of {} entries", entries.len())?;
    }
    Ok(())
}

fn cmd_bench(args: BenchArgs) -> Result<()> {
    let BenchArgs {
        model,
        refs,
        bank,
        images,
        frames,
        warmup,
        bank_dtype,
        json,
    } = args;
    if refs == 0 {
        anyhow::bail!("--refs must be at least 1");
    }
    let tty = std::io::stderr().is_terminal();
    if let Some(bank) = bank {
        let mut inspector = Inspector::load(&model.options(), &bank)
            .with_context(|| format!("cannot load the bank {}", bank.display()))?;
        let r = bench::run_bank(&mut inspector, &bank, &images, frames, warmup, |m| {
            if tty {
                eprintln!("bench: {m}")
            }
        })?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "edge-ad bench --bank: {} threads, {} frames ({} backbone passes each), {}, levels {:?}",
                r.threads, r.frames, r.tiles, r.selection, r.levels
            );
            println!(
                "  bank file {:.1} MB, peak memory (RSS) {}",
                r.bank_bytes as f64 / 1e6,
                r.peak_rss_mb
                    .map_or("unknown".to_string(), |m| format!("{m:.0} MB"))
            );
            println!("  {:<12} {:>9}", "stage", "median ms");
            for (name, ms) in [
                ("preprocess", r.preprocess_ms),
                ("backbone", r.backbone_ms),
                ("align", r.align_ms),
                ("residual", r.residual_ms),
                ("projector", r.projector_ms),
                ("score", r.score_ms),
                ("total", r.total_ms),
            ] {
                println!("  {name:<12} {ms:>9.2}");
            }
        }
        return Ok(());
    }
    let mut pipeline = model.load()?;
    let opts = BenchOptions {
        images,
        refs,
        frames,
        warmup,
        bank_dtype,
    };
    let r = bench::run(&mut pipeline, &opts, |m| {
        if tty {
            eprintln!("bench: {m}")
        }
    })?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
                "edge-ad bench: {} threads, {} frames ({} backbone passes each), bank {} refs, {} rows/level ({})",
                r.threads,
                r.frames,
                r.tiles,
                r.refs,
                r.bank_rows,
                bank_dtype.name()
            );
        println!("  {:<12} {:>9}", "stage", "median ms");
        println!("  {:<12} {:>9.2}", "preprocess", r.preprocess_ms);
        println!(
            "  {:<12} {:>9.2}   ({})",
            "backbone",
            r.backbone_ms,
            if r.backbone_on_gpu {
                "GPU, tract-cuda"
            } else {
                "CPU, tract"
            }
        );
        println!(
            "  {:<12} {:>9.2}   {:>6.1} GFLOP/s",
            "residual", r.residual_ms, r.residual_gflops
        );
        if let (Some(ms), Some(gf)) = (r.projector_ms, r.projector_gflops) {
            println!("  {:<12} {:>9.2}   {:>6.1} GFLOP/s", "projector", ms, gf);
        }
        println!("  {:<12} {:>9.2}", "score", r.score_ms);
        println!(
            "  {:<12} {:>9.2}   ({:.3} × backbone)",
            "total", r.total_ms, r.total_over_backbone
        );
        println!(
            "  sgemm at the residual size: {:.1} GFLOP/s",
            r.sgemm_gflops
        );
        if let Some(g) = &r.gpu {
            println!(
                "  GPU {} ({}), device times from CUDA events:",
                g.name, g.arch
            );
            println!(
                "    residual {:.1} TFLOP/s; cuBLAS fp16 GEMM at that shape {:.1} TFLOP/s",
                g.residual_tflops, g.gemm_tflops
            );
            if let (Some(ms), Some(tf)) = (g.attention_ms, g.attention_tflops) {
                println!("    LKV attention {ms:.3} ms, {tf:.1} TFLOP/s");
            }
            println!(
                "    residual + projector + FeatureNorm {:.3} ms, copies {:.3} ms",
                g.kernels_ms, g.transfer_ms
            );
        }
    }
    Ok(())
}

fn cmd_cameras() {
    let cams = edge_ad_line::camera::list_cameras();
    if cams.is_empty() {
        println!("no V4L2 capture devices (/dev/video*)");
    }
    for c in cams {
        println!("{}  {}", c.path.display(), c.name);
        for (fourcc, desc, sizes) in c.formats {
            println!("  {fourcc}  {desc}");
            for (w, h, fps) in sizes {
                let f: Vec<String> = fps.iter().map(|f| format!("{f:.0}")).collect();
                println!("    {w}×{h} @ {} fps", f.join(", "));
            }
        }
        if !c.controls.is_empty() {
            println!("  controls ([source.controls] names):");
            for ctl in c.controls {
                println!("    {ctl}");
            }
        }
    }
}
