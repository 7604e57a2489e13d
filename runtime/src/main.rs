//! `edge-ad`: the command-line shell over the edge-ad library. Every command is a thin user of
//! [`edge_ad::Pipeline`]; no stage of the pipeline lives here.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use edge_ad::bench::{self, BenchOptions};
use edge_ad::{Fit, Pipeline, PipelineOptions};
use edge_ad_kernels::BankDtype;
use std::io::IsTerminal;
use std::path::PathBuf;
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
    /// How frames are fitted to the network input: crop | stretch | pad (overrides the description).
    #[arg(long)]
    fit: Option<Fit>,
}

impl ModelArgs {
    fn load(&self) -> Result<Pipeline> {
        let opts = PipelineOptions {
            model: self.model.clone(),
            onnx: self.onnx.clone(),
            projector: self.projector.clone(),
            threads: self.threads,
            fit: self.fit,
        };
        Pipeline::load(&opts).context("cannot load the model")
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Time the pipeline per stage on real images and compare the kernels with this machine's SGEMM.
    ///
    /// The first --refs images of --images (sorted) build the bank; the others are cycled as
    /// frames. Prints medians over at least 20 frames after warm-up.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Reference images in the bank.
        #[arg(long, default_value_t = 8)]
        refs: usize,
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
    },
}

fn parse_dtype(s: &str) -> Result<BankDtype, String> {
    match s {
        "f16" => Ok(BankDtype::F16),
        "f32" => Ok(BankDtype::F32),
        other => Err(format!("`{other}`: expected f16 or f32")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&cli.log)).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-ad: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench {
            model,
            refs,
            images,
            frames,
            warmup,
            bank_dtype,
            json,
        } => {
            if refs == 0 {
                anyhow::bail!("--refs must be at least 1");
            }
            let mut pipeline = model.load()?;
            let tty = std::io::stderr().is_terminal();
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
                    "edge-ad bench: {} threads, {} frames, bank {} refs × {} rows/level ({})",
                    r.threads,
                    r.frames,
                    r.refs,
                    r.bank_rows / r.refs.max(1),
                    bank_dtype.name()
                );
                println!("  {:<12} {:>9}", "stage", "median ms");
                println!("  {:<12} {:>9.2}", "preprocess", r.preprocess_ms);
                println!("  {:<12} {:>9.2}", "backbone", r.backbone_ms);
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
            }
        }
    }
    Ok(())
}
