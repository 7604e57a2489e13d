//! The bank file: everything `inspect` needs besides the model.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `EDGEADBK` |
//! | 4 | format version (u32, currently 1) |
//! | 8 | header length `H` (u64) |
//! | H | header, UTF-8 JSON ([`BankHeader`]) |
//! | … | per level, `rows × channels` elements of the level's dtype (f16 or f32), row-major |
//! | 32 | SHA-256 of every byte before it |
//!
//! The checksum covers header and payload, so a flipped bit anywhere is detected; a short file is
//! reported as truncated with both lengths. Writes go to a temporary file in the target folder,
//! are fsynced, then renamed over the target: a power cut leaves the old bank or the new one,
//! never half of one.

use edge_ad_kernels::BankDtype;
use half::f16;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::threshold::Threshold;

/// File magic.
pub const MAGIC: &[u8; 8] = b"EDGEADBK";
/// Current format version.
pub const VERSION: u32 = 1;
const PREFIX: usize = 8 + 4 + 8;
const CHECKSUM: usize = 32;
/// Largest accepted header: a bank header is a few KiB; more means a corrupt length field.
const MAX_HEADER: u64 = 64 << 20;

/// Errors reading or writing a bank file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum BankFileError {
    /// The OS refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a bank file, or a version this build cannot read.
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file is shorter than its header says.
    #[error("{}: truncated: {expected} bytes expected, {found} present", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header implies.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The stored checksum does not match the content.
    #[error("{}: checksum mismatch: the bank is corrupted (recalibrate or restore a copy)", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// The bank was made for another backbone, model description or projector.
    #[error("{}: bank was made for another {what}: bank has {bank}, this run uses {current}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// "backbone (ONNX)", "model description" or "projector".
        what: &'static str,
        /// Identity recorded in the bank.
        bank: String,
        /// Identity in use now.
        current: String,
    },
}

/// What the bank's features depend on: a bank is valid only with the same three.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// SHA-256 (hex) of the ONNX bytes.
    pub onnx_sha256: String,
    /// SHA-256 (hex) of the model description's bytes (taps, input, fit …).
    pub model_sha256: String,
    /// SHA-256 (hex) of the projector weights, if a projector is used.
    pub projector_sha256: Option<String>,
}

/// Shape and precision of one level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelInfo {
    /// The model level (1-based tap number) this bank level scores; 0 in banks written before
    /// level selection existed, meaning "the level at this index".
    #[serde(default)]
    pub level: usize,
    /// Bank rows (reference windows × positions).
    pub rows: usize,
    /// Channels.
    pub channels: usize,
    /// `f16` or `f32`.
    pub dtype: String,
}

/// The JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BankHeader {
    /// Identities of backbone, model description and projector.
    pub identity: Identity,
    /// Model name (for people).
    pub model_name: String,
    /// Frame fit used at calibration (`crop`, `stretch`, `pad`, `tile`).
    pub fit: String,
    /// Backbone windows the references gave (tiles; equal to the reference count otherwise).
    #[serde(default)]
    pub windows: usize,
    /// Reference image names, in bank order.
    pub references: Vec<String>,
    /// How the references were chosen (`first`, `random`, `kmeans`, `list`) and from how many.
    pub selection: String,
    /// How the scored levels were chosen (`all`, `given`, `auto: …` with the criterion's numbers).
    #[serde(default)]
    pub level_choice: String,
    /// Per-level shapes.
    pub levels: Vec<LevelInfo>,
    /// Decision threshold and how it was set.
    pub threshold: Threshold,
    /// Semantic-aligned references: the level data holds the whole pool, and every frame's bank is
    /// built from the `k` pool images nearest it (spec §7.1). Absent: the level data is the bank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aligned: Option<AlignedPool>,
    /// edge-ad version that wrote the bank.
    pub written_by: String,
}

/// The pool of a semantic-aligned bank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignedPool {
    /// References per frame.
    pub k: usize,
    /// Model level (1-based) whose features the alignment histograms use.
    pub level: usize,
    /// Pool image names, in level-data order.
    pub images: Vec<String>,
    /// Backbone windows (tiles) of each pool image: its rows are `windows × positions`.
    pub windows: Vec<usize>,
    /// Centres and pool histograms.
    pub index: crate::aligned::AlignmentIndex,
}

/// One level's features.
#[derive(Debug, Clone, PartialEq)]
pub enum LevelData {
    /// Half precision.
    F16(Vec<f16>),
    /// Single precision.
    F32(Vec<f32>),
}

impl LevelData {
    /// Element type.
    pub fn dtype(&self) -> BankDtype {
        match self {
            LevelData::F16(_) => BankDtype::F16,
            LevelData::F32(_) => BankDtype::F32,
        }
    }
    fn len(&self) -> usize {
        match self {
            LevelData::F16(v) => v.len(),
            LevelData::F32(v) => v.len(),
        }
    }
}

/// A bank: header plus per-level features.
#[derive(Debug, Clone, PartialEq)]
pub struct BankFile {
    /// Metadata.
    pub header: BankHeader,
    /// Features per level, in level order, matching `header.levels`.
    pub levels: Vec<LevelData>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of bytes, as lower-case hex (the identity format).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

impl BankHeader {
    /// The model levels (1-based) the bank scores, in bank order.
    pub fn scored_levels(&self) -> Vec<usize> {
        self.levels
            .iter()
            .enumerate()
            .map(|(i, l)| if l.level == 0 { i + 1 } else { l.level })
            .collect()
    }
}

impl BankFile {
    /// Serialise to bytes (with checksum).
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        if self.levels.len() != self.header.levels.len() {
            return Err(format!(
                "{} levels of data for {} in the header",
                self.levels.len(),
                self.header.levels.len()
            ));
        }
        for (i, (d, info)) in self.levels.iter().zip(&self.header.levels).enumerate() {
            if d.len() != info.rows * info.channels || d.dtype().name() != info.dtype {
                return Err(format!(
                    "level {}: data does not match header {info:?}",
                    i + 1
                ));
            }
        }
        let header = serde_json::to_vec(&self.header).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(PREFIX + header.len() + CHECKSUM);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for d in &self.levels {
            match d {
                LevelData::F16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                LevelData::F32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            }
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        Ok(out)
    }

    /// Parse bytes read from `path` (used in messages only).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, BankFileError> {
        let fmt = |message: String| BankFileError::Format {
            path: path.into(),
            message,
        };
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(fmt("not an edge-ad bank file (bad magic)".into()));
        }
        if bytes.len() < PREFIX {
            return Err(BankFileError::Truncated {
                path: path.into(),
                expected: PREFIX as u64,
                found: bytes.len() as u64,
            });
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(fmt(format!(
                "bank format version {version}; this edge-ad reads version {VERSION}"
            )));
        }
        let hlen = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        if hlen > MAX_HEADER {
            return Err(fmt(format!(
                "header length {hlen} is implausible (corrupted file)"
            )));
        }
        let hend = PREFIX as u64 + hlen;
        if (bytes.len() as u64) < hend + CHECKSUM as u64 {
            return Err(BankFileError::Truncated {
                path: path.into(),
                expected: hend + CHECKSUM as u64,
                found: bytes.len() as u64,
            });
        }
        let header_bytes = &bytes[PREFIX..hend as usize];
        // The checksum is checked before the header is trusted for anything but lengths.
        let header: Result<BankHeader, _> = serde_json::from_slice(header_bytes);
        let expected_len = header.as_ref().ok().map(|h| {
            hend + h
                .levels
                .iter()
                .map(|l| (l.rows * l.channels * if l.dtype == "f16" { 2 } else { 4 }) as u64)
                .sum::<u64>()
                + CHECKSUM as u64
        });
        if let Some(expected) = expected_len {
            if (bytes.len() as u64) < expected {
                return Err(BankFileError::Truncated {
                    path: path.into(),
                    expected,
                    found: bytes.len() as u64,
                });
            }
        }
        let body = &bytes[..bytes.len() - CHECKSUM];
        if Sha256::digest(body).as_slice() != &bytes[bytes.len() - CHECKSUM..] {
            return Err(BankFileError::Checksum { path: path.into() });
        }
        let header = header.map_err(|e| fmt(format!("header: {e}")))?;
        let levels = header.scored_levels();
        if levels.contains(&0) || levels.windows(2).any(|w| w[0] >= w[1]) {
            return Err(fmt(format!(
                "header: levels {levels:?} must be 1-based and strictly increasing"
            )));
        }
        if expected_len != Some(bytes.len() as u64) {
            return Err(fmt(format!(
                "{} bytes, header implies {:?}",
                bytes.len(),
                expected_len
            )));
        }
        let mut off = hend as usize;
        let mut levels = Vec::with_capacity(header.levels.len());
        for (i, l) in header.levels.iter().enumerate() {
            let n = l.rows * l.channels;
            levels.push(match l.dtype.as_str() {
                "f16" => {
                    let v = bytes[off..off + 2 * n]
                        .chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .collect();
                    off += 2 * n;
                    LevelData::F16(v)
                }
                "f32" => {
                    let v = bytes[off..off + 4 * n]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    off += 4 * n;
                    LevelData::F32(v)
                }
                other => return Err(fmt(format!("level {}: unknown dtype `{other}`", i + 1))),
            });
        }
        Ok(Self { header, levels })
    }

    /// Read and verify a bank file.
    pub fn load(path: &Path) -> Result<Self, BankFileError> {
        let bytes = std::fs::read(path).map_err(|source| BankFileError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Refuse a bank made for another backbone, model description or projector.
    pub fn check_identity(&self, current: &Identity, path: &Path) -> Result<(), BankFileError> {
        let b = &self.header.identity;
        let mismatch = |what, bank: &str, cur: &str| BankFileError::Mismatch {
            path: path.into(),
            what,
            bank: bank.to_string(),
            current: cur.to_string(),
        };
        if b.onnx_sha256 != current.onnx_sha256 {
            return Err(mismatch(
                "backbone (ONNX sha256)",
                &b.onnx_sha256,
                &current.onnx_sha256,
            ));
        }
        if b.model_sha256 != current.model_sha256 {
            return Err(mismatch(
                "model description (sha256)",
                &b.model_sha256,
                &current.model_sha256,
            ));
        }
        if b.projector_sha256 != current.projector_sha256 {
            let show = |p: &Option<String>| p.clone().unwrap_or_else(|| "no projector".into());
            return Err(mismatch(
                "projector",
                &show(&b.projector_sha256),
                &show(&current.projector_sha256),
            ));
        }
        Ok(())
    }

    /// Write atomically: temporary file in the same folder, fsync, rename, fsync the folder.
    pub fn save(&self, path: &Path) -> Result<(), BankFileError> {
        let bytes = self.to_bytes().map_err(|message| BankFileError::Format {
            path: path.into(),
            message,
        })?;
        write_atomic(path, &bytes)
    }
}

/// Write `bytes` to `path` so that readers see the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BankFileError> {
    let io = |source| BankFileError::Io {
        path: path.into(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("folder {} does not exist", dir.display()),
        )));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threshold::ThresholdRule;

    fn sample() -> BankFile {
        let id = Identity {
            onnx_sha256: "aa".into(),
            model_sha256: "bb".into(),
            projector_sha256: None,
        };
        BankFile {
            header: BankHeader {
                identity: id,
                model_name: "m".into(),
                fit: "crop".into(),
                windows: 2,
                references: vec!["a.png".into(), "b.png".into()],
                selection: "first".into(),
                level_choice: "all".into(),
                levels: vec![
                    LevelInfo {
                        level: 0,
                        rows: 2,
                        channels: 3,
                        dtype: "f16".into(),
                    },
                    LevelInfo {
                        level: 0,
                        rows: 2,
                        channels: 3,
                        dtype: "f32".into(),
                    },
                ],
                threshold: Threshold::from_scores(&[0.5, 0.6], ThresholdRule::default()).unwrap(),
                aligned: None,
                written_by: "test".into(),
            },
            levels: vec![
                LevelData::F16((0..6).map(|i| f16::from_f32(i as f32 * 0.25)).collect()),
                LevelData::F32((0..6).map(|i| i as f32 * -1.5).collect()),
            ],
        }
    }

    #[test]
    fn round_trip_through_an_atomic_write() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bank.eab");
        let b = sample();
        b.save(&p).unwrap();
        assert_eq!(BankFile::load(&p).unwrap(), b);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn truncation_and_corruption_are_detected() {
        let p = Path::new("bank.eab");
        let bytes = sample().to_bytes().unwrap();
        for cut in [5, 15, 30, bytes.len() - 40, bytes.len() - 1] {
            let e = BankFile::from_bytes(&bytes[..cut], p)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("truncated") || e.contains("magic") || e.contains("checksum"),
                "cut {cut}: {e}"
            );
        }
        let e = BankFile::from_bytes(&bytes[..bytes.len() - 1], p).unwrap_err();
        assert!(
            matches!(
                e,
                BankFileError::Truncated { .. } | BankFileError::Checksum { .. }
            ),
            "{e}"
        );
        for pos in [25, bytes.len() / 2, bytes.len() - 50, bytes.len() - 3] {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            let e = BankFile::from_bytes(&bad, p).unwrap_err();
            assert!(
                matches!(
                    e,
                    BankFileError::Checksum { .. } | BankFileError::Truncated { .. }
                ),
                "flip at {pos}: {e}"
            );
        }
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(BankFile::from_bytes(&v2, p)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
    }

    #[test]
    fn identity_mismatch_says_which() {
        let b = sample();
        let mut cur = b.header.identity.clone();
        assert!(b.check_identity(&cur, Path::new("x")).is_ok());
        cur.model_sha256 = "cc".into();
        assert!(b
            .check_identity(&cur, Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("model description"));
        let mut cur = b.header.identity.clone();
        cur.onnx_sha256 = "zz".into();
        assert!(b
            .check_identity(&cur, Path::new("x"))
            .unwrap_err()
            .to_string()
            .contains("backbone"));
        let mut cur = b.header.identity.clone();
        cur.projector_sha256 = Some("pp".into());
        let e = b
            .check_identity(&cur, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("projector") && e.contains("no projector") && e.contains("pp"),
            "{e}"
        );
    }

    #[test]
    fn missing_folder_is_an_error_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope/bank.eab");
        let e = sample().save(&p).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
