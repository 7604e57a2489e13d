//! Write the full-size (C = 384, N_r = 2048) projector of conformance case d as safetensors, for
//! `edge-ad bench --projector` and manual runs.
//!
//! `cargo run -p edge-ad-tests --example conformance_projector -- OUT.safetensors [MANIFEST]`
//! (MANIFEST defaults to `../shared/conformance/adpretrain/manifest.json`).

use edge_ad_tests::{generated_projector, manifest_case, shared_dir};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: conformance_projector OUT.safetensors [MANIFEST]");
        return ExitCode::from(2);
    };
    let manifest = match args.next().map(PathBuf::from) {
        Some(m) => m,
        None => match shared_dir() {
            Some(d) => d.join("conformance/adpretrain/manifest.json"),
            None => {
                eprintln!("conformance_projector: ../shared not found; pass the manifest path");
                return ExitCode::from(2);
            }
        },
    };
    let case = manifest_case(&manifest, "d_end_to_end.safetensors");
    let bytes = generated_projector(&case["projector"]["weight_generator"]);
    if let Err(e) = std::fs::write(&out, bytes) {
        eprintln!("conformance_projector: {}: {e}", out.display());
        return ExitCode::from(1);
    }
    println!("wrote {}", out.display());
    ExitCode::SUCCESS
}
