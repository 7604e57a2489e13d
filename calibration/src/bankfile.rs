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
//! reported as truncated with both lengths. A file whose checksum holds may still have been edited
//! by hand (checksum recomputed) or written by a buggy build, so every field is validated too: the
//! reader never panics and never allocates for a size the input does not hold, whatever the bytes.
//!
//! Writes go to a temporary file `.{name}.tmp-<pid>` in the target folder, are fsynced, then
//! renamed over the target: a power cut leaves the old bank or the new one, never half of one.
//! Temporary files of writers that died before the rename are removed by the next write.

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
    /// Not a bank file, a version this build cannot read, or an invalid field (the message names
    /// the field and its value).
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

/// Largest alignment grid a bank may declare. Calibration uses 5; a pool histogram holds
/// grid⁴ · clusters bins, so at 64 one image's histogram already has 16.7 M bins.
pub const MAX_GRID: usize = 64;

/// A byte count as people read it (decimal units): `36 B`, `1.2 MB`, `6.6 TB`.
fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `bytes.len()` as u64 (lossless: no Rust target has a wider usize).
fn len64(bytes: &[u8]) -> u64 {
    u64::try_from(bytes.len()).unwrap_or(u64::MAX)
}

fn le_u32(b: Option<&[u8]>) -> Option<u32> {
    Some(u32::from_le_bytes(b?.try_into().ok()?))
}

fn le_u64(b: Option<&[u8]>) -> Option<u64> {
    Some(u64::from_le_bytes(b?.try_into().ok()?))
}

/// Byte length of bank level `i` (1-based) from its header fields. Refuses unknown dtypes, empty
/// shapes and products that overflow: these fields come from the file and are not trusted.
fn level_bytes(i: usize, l: &LevelInfo) -> Result<u64, String> {
    let width: u64 = match l.dtype.as_str() {
        "f16" => 2,
        "f32" => 4,
        other => {
            return Err(format!(
                "level {i} dtype = `{other}` is unknown (f16 or f32)"
            ))
        }
    };
    if l.rows == 0 || l.channels == 0 {
        return Err(format!(
            "level {i} rows = {} × channels = {}: a level holds at least one value",
            l.rows, l.channels
        ));
    }
    u64::try_from(l.rows)
        .ok()
        .zip(u64::try_from(l.channels).ok())
        .and_then(|(r, c)| r.checked_mul(c)?.checked_mul(width))
        .ok_or_else(|| {
            format!(
                "level {i} rows = {} × channels = {} × {width} bytes ({}) overflows 64 bits",
                l.rows, l.channels, l.dtype
            )
        })
}

/// Byte length of every level's data, each checked against what is still left of the `left` bytes
/// between header and checksum before anything is read or allocated.
fn layout(levels: &[LevelInfo], left: u64) -> Result<Vec<usize>, String> {
    let mut rest = left;
    let mut out = Vec::with_capacity(levels.len());
    for (i, l) in levels.iter().enumerate() {
        let n = level_bytes(i + 1, l)?;
        if n > rest {
            return Err(format!(
                "level {} rows = {} × channels = {} ({}) needs {} but the file has {} left",
                i + 1,
                l.rows,
                l.channels,
                l.dtype,
                human(n),
                human(rest)
            ));
        }
        rest -= n;
        out.push(usize::try_from(n).map_err(|_| format!("level {} is {n} bytes", i + 1))?);
    }
    if rest != 0 {
        return Err(format!(
            "the levels' data is {} bytes but the file holds {left} between header and checksum",
            left - rest
        ));
    }
    Ok(out)
}

/// File length the header implies, when its sizes are known and do not overflow (a cut file is
/// reported with it).
fn implied_len(hend: u64, levels: &[LevelInfo]) -> Option<u64> {
    levels
        .iter()
        .enumerate()
        .try_fold(hend.checked_add(CHECKSUM as u64)?, |acc, (i, l)| {
            acc.checked_add(level_bytes(i + 1, l).ok()?)
        })
}

/// Refuse a NaN or infinite feature: every distance to it is NaN or infinite, and a bank of them
/// scored every part `-inf` and passed it.
fn check_finite(i: usize, info: &LevelInfo, data: &LevelData) -> Result<(), String> {
    let bad = match data {
        LevelData::F16(v) => v
            .iter()
            .enumerate()
            .find(|(_, x)| !x.is_finite())
            .map(|(p, x)| (p, x.to_f32())),
        LevelData::F32(v) => v
            .iter()
            .enumerate()
            .find(|(_, x)| !x.is_finite())
            .map(|(p, &x)| (p, x)),
    };
    match bad {
        Some((p, x)) => {
            let c = info.channels.max(1);
            Err(format!(
                "level {i} row {} channel {}: non-finite feature value {x}",
                p / c,
                p % c
            ))
        }
        None => Ok(()),
    }
}

/// Refuse a threshold with a non-finite number: a NaN threshold passes nothing and an infinite
/// one passes everything.
fn check_threshold(t: &Threshold) -> Result<(), String> {
    use crate::threshold::ThresholdRule as R;
    let mut fields = vec![
        ("value", t.value),
        ("normal_min", t.normal_min),
        ("normal_max", t.normal_max),
        ("normal_mean", t.normal_mean),
        ("normal_std", t.normal_std),
        match t.rule {
            R::MaxTimesMargin { margin } => ("rule.margin", margin),
            R::MeanPlusKSigma { k } => ("rule.k", k),
            R::Quantile { false_reject } => ("rule.false_reject", false_reject),
            R::Conformal { reject_rate } => ("rule.reject_rate", reject_rate),
        },
    ];
    if let Some(r) = t.expected_false_reject {
        fields.push(("expected_false_reject", r));
    }
    if let Some(d) = &t.defects {
        fields.extend([
            ("defects.min", d.min),
            ("defects.max", d.max),
            ("defects.gap", d.gap),
            ("defects.separation", d.separation),
        ]);
    }
    match fields.into_iter().find(|(_, v)| !v.is_finite()) {
        Some((name, v)) => Err(format!("threshold.{name} = {v} is non-finite")),
        None => Ok(()),
    }
}

/// Refuse an aligned pool inspection could not use without indexing out of range, dividing by
/// zero or allocating what the file does not hold: every count, length and index is checked
/// against the others and against the level data.
fn check_aligned(p: &AlignedPool, h: &BankHeader) -> Result<(), String> {
    let idx = &p.index;
    let n = p.images.len();
    if p.windows.len() != n || idx.histograms.len() != n {
        return Err(format!(
            "aligned: {n} images, {} window counts (aligned.windows) and {} histograms \
             (aligned.index.histograms) must agree",
            p.windows.len(),
            idx.histograms.len()
        ));
    }
    if p.k == 0 || p.k > n {
        return Err(format!(
            "aligned.k = {} must be 1..={n} (the pool's images)",
            p.k
        ));
    }
    if p.level == 0 {
        return Err("aligned.level = 0: levels are 1-based".into());
    }
    if let Some(i) = p.windows.iter().position(|&w| w == 0) {
        return Err(format!(
            "aligned.windows[{i}] = 0: a pool image has at least one window"
        ));
    }
    let total = p
        .windows
        .iter()
        .try_fold(0usize, |a, &w| a.checked_add(w))
        .ok_or("aligned.windows: the sum overflows")?;
    // The level data is the whole pool: rows = windows × positions.
    for (i, l) in h.levels.iter().enumerate() {
        if l.rows % total != 0 {
            return Err(format!(
                "level {} rows = {} is not a multiple of the pool's {total} windows (aligned.windows)",
                i + 1,
                l.rows
            ));
        }
    }
    if idx.grid == 0 || idx.grid > MAX_GRID {
        return Err(format!(
            "aligned.index.grid = {} is outside 1..={MAX_GRID}",
            idx.grid
        ));
    }
    if idx.clusters == 0 || idx.channels == 0 {
        return Err(format!(
            "aligned.index.clusters = {} and aligned.index.channels = {} must both be at least 1",
            idx.clusters, idx.channels
        ));
    }
    // The alignment level's features are compared with the centres.
    if let Some(l) = h
        .scored_levels()
        .iter()
        .position(|&m| m == p.level)
        .and_then(|i| h.levels.get(i))
    {
        if l.channels != idx.channels {
            return Err(format!(
                "aligned.index.channels = {} but level {} has {} channels",
                idx.channels, p.level, l.channels
            ));
        }
    }
    let cells = idx.grid * idx.grid; // ≤ MAX_GRID²
    let bins = cells.checked_mul(idx.clusters);
    let want = |n: Option<usize>| n.map_or("more than 2^64".to_string(), |n| n.to_string());
    let centres = bins.and_then(|b| b.checked_mul(idx.channels));
    if centres != Some(idx.centres.len()) {
        return Err(format!(
            "aligned.index.centres has {} values; grid {}² × clusters {} × channels {} needs {}",
            idx.centres.len(),
            idx.grid,
            idx.clusters,
            idx.channels,
            want(centres)
        ));
    }
    let hist = bins.and_then(|b| b.checked_mul(cells));
    if let Some((i, v)) = idx
        .histograms
        .iter()
        .enumerate()
        .find(|(_, v)| Some(v.len()) != hist)
    {
        return Err(format!(
            "aligned.index.histograms[{i}] has {} values; {cells} cells × {} bins needs {}",
            v.len(),
            want(bins),
            want(hist)
        ));
    }
    if !(idx.temperature.is_finite() && idx.temperature > 0.0) {
        return Err(format!(
            "aligned.index.temperature = {} must be finite and positive",
            idx.temperature
        ));
    }
    if let Some((j, v)) = idx.centres.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(format!("aligned.index.centres[{j}] = {v} is non-finite"));
    }
    for (i, hg) in idx.histograms.iter().enumerate() {
        if let Some((j, v)) = hg
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(format!(
                "aligned.index.histograms[{i}][{j}] = {v} is non-finite or negative (a histogram \
                 holds probabilities)"
            ));
        }
    }
    Ok(())
}

/// Everything in the header but the level sizes: level numbering, threshold, aligned pool.
fn check_header(h: &BankHeader) -> Result<(), String> {
    if h.levels.is_empty() {
        return Err("header: no levels: a bank scores at least one".into());
    }
    let levels = h.scored_levels();
    if levels.contains(&0) || levels.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "header: levels {levels:?} must be 1-based and strictly increasing"
        ));
    }
    check_threshold(&h.threshold)?;
    if let Some(p) = &h.aligned {
        check_aligned(p, h)?;
    }
    Ok(())
}

impl BankFile {
    /// Serialise to bytes (with checksum). Refuses what [`BankFile::from_bytes`] would refuse, so a
    /// bank that could not be loaded is never written.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        if self.levels.len() != self.header.levels.len() {
            return Err(format!(
                "{} levels of data for {} in the header",
                self.levels.len(),
                self.header.levels.len()
            ));
        }
        for (i, (d, info)) in self.levels.iter().zip(&self.header.levels).enumerate() {
            level_bytes(i + 1, info)?;
            if info.rows.checked_mul(info.channels) != Some(d.len())
                || d.dtype().name() != info.dtype
            {
                return Err(format!(
                    "level {}: data does not match header {info:?}",
                    i + 1
                ));
            }
            check_finite(i + 1, info, d)?;
        }
        check_header(&self.header)?;
        let header = serde_json::to_vec(&self.header).map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(PREFIX + header.len() + CHECKSUM);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&len64(&header).to_le_bytes());
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
    ///
    /// Nothing in the file is trusted before it is checked: every size is compared with the bytes
    /// actually left before anything is read or allocated, all arithmetic on file fields is
    /// checked, every header field is validated (see [`BankFileError::Format`] messages, which
    /// name the field and its value) and NaN or infinite features are refused. No input panics.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, BankFileError> {
        let fmt = |message: String| BankFileError::Format {
            path: path.into(),
            message,
        };
        let found = len64(bytes);
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err(fmt("not an edge-ad bank file (bad magic)".into()));
        }
        let (Some(version), Some(hlen)) = (le_u32(bytes.get(8..12)), le_u64(bytes.get(12..20)))
        else {
            return Err(BankFileError::Truncated {
                path: path.into(),
                expected: PREFIX as u64,
                found,
            });
        };
        if version != VERSION {
            return Err(fmt(format!(
                "bank format version {version}; this edge-ad reads version {VERSION}"
            )));
        }
        if hlen > MAX_HEADER {
            return Err(fmt(format!(
                "header length {hlen} is implausible (corrupted file)"
            )));
        }
        // No overflow: hlen ≤ MAX_HEADER.
        let hend = PREFIX as u64 + hlen;
        if found < hend + CHECKSUM as u64 {
            return Err(BankFileError::Truncated {
                path: path.into(),
                expected: hend + CHECKSUM as u64,
                found,
            });
        }
        // In range: PREFIX ≤ hend ≤ bytes.len() − CHECKSUM.
        let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM);
        let hend_at = usize::try_from(hend).unwrap_or(usize::MAX);
        let (Some(header_bytes), Some(payload)) = (body.get(PREFIX..hend_at), body.get(hend_at..))
        else {
            return Err(fmt(format!("header length {hlen} exceeds the file")));
        };
        let header: Result<BankHeader, _> = serde_json::from_slice(header_bytes);
        if Sha256::digest(body).as_slice() != sum {
            // A cut file keeps its header: report the length it should have.
            if let Some(expected) = header
                .as_ref()
                .ok()
                .and_then(|h| implied_len(hend, &h.levels))
            {
                if found < expected {
                    return Err(BankFileError::Truncated {
                        path: path.into(),
                        expected,
                        found,
                    });
                }
            }
            return Err(BankFileError::Checksum { path: path.into() });
        }
        // The checksum holds: from here on a refusal is a bank written wrong or edited by hand.
        let header = header.map_err(|e| fmt(format!("header: {e}")))?;
        let sizes = layout(&header.levels, len64(payload)).map_err(fmt)?;
        check_header(&header).map_err(fmt)?;
        let mut rest = payload;
        let mut levels = Vec::with_capacity(sizes.len());
        for (i, (l, n)) in header.levels.iter().zip(sizes).enumerate() {
            // `layout` checked that the sizes add up to the payload.
            let Some((chunk, tail)) = rest.split_at_checked(n) else {
                return Err(fmt(format!("level {}: {n} bytes exceed the file", i + 1)));
            };
            rest = tail;
            let data = match l.dtype.as_str() {
                "f16" => LevelData::F16(
                    chunk
                        .chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                ),
                "f32" => LevelData::F32(
                    chunk
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                other => return Err(fmt(format!("level {}: unknown dtype `{other}`", i + 1))),
            };
            check_finite(i + 1, l, &data).map_err(fmt)?;
            levels.push(data);
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

/// Remove temporary files of `name` in `dir` left by writers killed between the write and the
/// rename (kill -9, power cut): `.{name}.tmp-<pid>` whose process no longer exists. Nothing else
/// would ever remove them, and each is a whole bank.
///
/// Liveness is the existence of `/proc/<pid>`; without `/proc` nothing is removed. Our own pid is
/// skipped: that name is the one we are about to write, and another thread of ours may be using
/// it. A reused pid keeps a stale file until that process ends (harmless). A writer in another pid
/// namespace sharing the folder looks dead; removing its file makes its rename fail with an error,
/// it never publishes a partial bank. Best effort: failures are ignored.
fn remove_stale_temps(dir: &Path, name: &str) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    let own = std::process::id();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && pid != own && !proc.join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Write `bytes` to `path` so that readers see the old file or the new one, never a mix. Stale
/// temporary files of the same target left by dead writers are removed first
/// (see `remove_stale_temps`).
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
    remove_stale_temps(&dir, &name);
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
pub(crate) mod tests {
    use super::*;
    use crate::threshold::ThresholdRule;

    pub(crate) fn sample() -> BankFile {
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
                threshold: Threshold::from_scores(
                    &[0.5, 0.6],
                    ThresholdRule::MaxTimesMargin { margin: 1.05 },
                )
                .unwrap(),
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

    #[test]
    fn a_save_removes_temporary_files_of_dead_writers_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bank.eab");
        // Above any pid_max (at most 2^22 on Linux): no process can have it.
        let dead = d.path().join(format!(".bank.eab.tmp-{}", 0x7fff_fff0u32));
        // A live process other than us (whose own name the save reuses and renames away).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let live = d.path().join(format!(".bank.eab.tmp-{}", child.id()));
        let other_target = d.path().join(format!(".other.eab.tmp-{}", 0x7fff_fff0u32));
        let not_a_pid = d.path().join(".bank.eab.tmp-12x");
        for f in [&dead, &live, &other_target, &not_a_pid] {
            std::fs::write(f, b"half a bank").unwrap();
        }
        sample().save(&p).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            !dead.exists(),
            "stale temporary file of a dead pid left behind"
        );
        for f in [&live, &other_target, &not_a_pid] {
            assert_eq!(std::fs::read(f).unwrap(), b"half a bank", "{}", f.display());
        }
        assert_eq!(BankFile::load(&p).unwrap(), sample());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 4);
    }

    #[test]
    fn sizes_are_shown_in_decimal_units() {
        assert_eq!(human(36), "36 B");
        assert_eq!(human(1_234_567), "1.2 MB");
        assert_eq!(human(4_294_967_295 * 768 * 2), "6.6 TB");
        assert_eq!(human(u64::MAX), "18.4 EB");
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would_refuse() {
        let mut b = sample();
        b.levels[1] = LevelData::F32(vec![0.0, 1.0, f32::NAN, 3.0, 4.0, 5.0]);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bank.eab");
        let e = b.save(&p).unwrap_err().to_string();
        assert!(
            e.contains("bank.eab")
                && e.contains("level 2 row 0 channel 2: non-finite feature value NaN"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let mut b = sample();
        b.header.threshold.value = f64::INFINITY;
        let e = b.to_bytes().unwrap_err();
        assert_eq!(e, "threshold.value = inf is non-finite");
    }
}
