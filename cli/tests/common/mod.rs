//! Helpers shared by the integration tests that drive the `edge-ad` binary.
// Each test file uses a different subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The bundled demo folder.
pub fn demo() -> PathBuf {
    root().join("demo")
}

/// The bundled demo model description.
pub fn demo_model() -> PathBuf {
    demo().join("efficientnet-lite0.toml")
}

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// True when the DINOv2-S ONNX has been fetched; prints SKIPPED otherwise, and panics in CI.
pub fn dinov2_present() -> bool {
    if root().join("models/vit_s_focus.onnx").is_file() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "models/vit_s_focus.onnx missing in CI (tools/setup.sh fetches it)"
    );
    eprintln!("SKIPPED: models/vit_s_focus.onnx not fetched");
    false
}

/// Run edge-ad with `args`.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-ad"))
        .args(args)
        .output()
        .unwrap()
}

/// Run edge-ad, require success, return stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "edge-ad {args:?} failed:\n{err}");
    String::from_utf8(out.stdout).unwrap()
}

/// Run edge-ad, require a clean failure (exit 2, no panic), return stderr.
pub fn fails(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "edge-ad {args:?} succeeded:\n{err}");
    assert_eq!(out.status.code(), Some(2), "edge-ad {args:?}: {err}");
    assert!(
        !err.contains("panicked"),
        "edge-ad {args:?} panicked:\n{err}"
    );
    err
}

/// The test venv's Python (tools/setup.sh), or `None` with a SKIPPED line outside CI.
#[allow(dead_code)]
pub fn venv_python() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    if py.is_file() {
        return Some(py);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        ".venv missing in CI (tools/setup.sh creates it)"
    );
    eprintln!("SKIPPED: .venv not set up (run tools/setup.sh)");
    None
}

/// A demo bank (4 references from the bundled good parts) calibrated into `dir`.
pub fn demo_bank(dir: &Path) -> PathBuf {
    let b = dir.join("demo.eab");
    ok(&[
        "calibrate",
        "--model",
        s(&demo_model()),
        "--refs",
        "4",
        "--images",
        s(&root().join("demo/images/good")),
        "--out",
        s(&b),
    ]);
    b
}

/// `../shared/data/magnetic_tile`, or `None` (with a SKIPPED line) outside CI when it is absent.
pub fn magnetic_tile() -> Option<PathBuf> {
    let shared = root().join("../shared/data/magnetic_tile");
    if shared.is_dir() {
        return Some(shared);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "../shared/data/magnetic_tile missing in CI"
    );
    eprintln!("SKIPPED: ../shared/data/magnetic_tile absent");
    None
}
