//! The model description: a TOML file saying what the backbone is, how to feed it and where to tap
//! it (spec §1–§2). Its hash is part of every bank's identity.
//!
//! ```toml
//! onnx = "vit_s_focus.onnx"          # relative to this file; --onnx overrides it
//! [input]
//! size = [224, 224]                   # network input, height × width
//! resize = 224                        # shorter side before the crop (fit = "crop")
//! fit = "crop"                        # crop | stretch | pad | tile
//! mean = [0.485, 0.456, 0.406]
//! std = [0.229, 0.224, 0.225]
//! # roi = [x, y, width, height]      # optional region of interest in frame pixels
//! [features]
//! layout = "tokens"                   # tokens [N, prefix + h·w, C] | maps [N, C, h, w]
//! prefix_tokens = 1                   # CLS + registers to drop (tokens only)
//! grid = [16, 16]
//! channels = 384
//! [[taps]]
//! level = 1
//! output = "/backbone/encoder/layer.2/Add_1_output_0"
//! ```

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a frame is brought to the network's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Shorter side to `resize`, then a centre crop: the reference pipeline (spec §1); drops the
    /// ends of long parts.
    #[default]
    Crop,
    /// Both sides to the input size: everything kept, aspect changed.
    Stretch,
    /// Longer side to the input size, centred, the rest filled with the mean colour.
    Pad,
    /// Shorter side to the input size at native aspect, the longer side covered by the fewest
    /// overlapping input-sized tiles; each tile runs through the backbone and the tile maps are
    /// stitched (max where they overlap). Sees the whole part at full detail; costs one backbone
    /// pass per tile.
    Tile,
}

impl Fit {
    /// Every mode, for parsing and messages.
    pub const ALL: [Fit; 4] = [Fit::Crop, Fit::Stretch, Fit::Pad, Fit::Tile];

    /// The name used in model descriptions, banks and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fit::Crop => "crop",
            Fit::Stretch => "stretch",
            Fit::Pad => "pad",
            Fit::Tile => "tile",
        }
    }
}

impl std::fmt::Display for Fit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Fit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Fit::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown fit `{s}`: expected crop, stretch, pad or tile"))
    }
}

/// Tensor layout of the tapped outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// ViT tokens `[N, prefix + h·w, C]`, patch tokens row-major.
    Tokens,
    /// CNN feature maps `[N, C, h, w]`.
    Maps,
}

/// Input section of the description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// ONNX input name; the graph's first input when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Network input `[height, width]`.
    pub size: [usize; 2],
    /// Shorter side after resizing, for `fit = "crop"` (at least the larger input side).
    pub resize: usize,
    /// How frames are fitted to the input.
    #[serde(default)]
    pub fit: Fit,
    /// Per-channel mean (RGB) subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    pub std: [f32; 3],
    /// Smallest accepted image side in pixels: smaller images are refused rather than blown up.
    #[serde(default = "default_min_side")]
    pub min_side: usize,
    /// Region of interest `[x, y, width, height]` in frame pixels; only it is inspected.
    #[serde(default)]
    pub roi: Option<[usize; 4]>,
}

fn default_min_side() -> usize {
    32
}

/// Feature layout section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Features {
    /// Tokens or maps.
    pub layout: Layout,
    /// Leading tokens to drop (CLS, registers); tokens only.
    #[serde(default)]
    pub prefix_tokens: usize,
    /// Feature grid `[h, w]`.
    pub grid: [usize; 2],
    /// Channels per level.
    pub channels: usize,
}

/// One tapped graph output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tap {
    /// Level number, 1-based, levels in increasing order.
    pub level: usize,
    /// ONNX node output name.
    pub output: String,
}

/// Scoring section (spec §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Score {
    /// Gaussian sigma of the map smoothing, in map pixels.
    #[serde(default = "default_sigma")]
    pub sigma: f64,
    /// `code` (`sqrt(‖e‖+1)−1`, the authors' code) or `paper` (`sqrt(‖e‖²+1)−1`).
    #[serde(default = "default_norm")]
    pub norm: String,
    /// Levels (1-based tap numbers) `calibrate` scores unless told otherwise; all when absent.
    #[serde(default)]
    pub levels: Option<Vec<usize>>,
}

fn default_sigma() -> f64 {
    4.0
}
fn default_norm() -> String {
    "code".into()
}
impl Default for Score {
    fn default() -> Self {
        Self {
            sigma: default_sigma(),
            norm: default_norm(),
            levels: None,
        }
    }
}

/// A parsed, validated model description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDescription {
    /// A name for humans and logs.
    #[serde(default)]
    pub name: String,
    /// ONNX file, relative to the description's folder.
    pub onnx: PathBuf,
    /// Input preparation.
    pub input: Input,
    /// Feature layout.
    pub features: Features,
    /// Tapped outputs, one per level.
    pub taps: Vec<Tap>,
    /// Scoring parameters.
    #[serde(default)]
    pub score: Score,
}

/// A description with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedDescription {
    /// The parsed description.
    pub desc: ModelDescription,
    /// The TOML file.
    pub path: PathBuf,
    /// The TOML bytes, for hashing into bank identities.
    pub bytes: Vec<u8>,
}

impl LoadedDescription {
    /// The ONNX file: `onnx_override` if given, else the description's path resolved against the
    /// TOML file's folder.
    pub fn onnx_path(&self, onnx_override: Option<&Path>) -> PathBuf {
        match onnx_override {
            Some(p) => p.to_path_buf(),
            None => self
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join(&self.desc.onnx),
        }
    }
}

impl ModelDescription {
    /// Read and validate a description.
    pub fn load(path: &Path) -> Result<LoadedDescription> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| Error::ModelDescription {
            path: path.into(),
            message: format!("not UTF-8 text: {e}"),
        })?;
        let desc = Self::parse(text).map_err(|message| Error::ModelDescription {
            path: path.into(),
            message,
        })?;
        Ok(LoadedDescription {
            desc,
            path: path.into(),
            bytes,
        })
    }

    /// The description with its fit replaced (`--fit`), validated again: a crop larger than
    /// the resized frame is refused here instead of underflowing later.
    pub fn with_fit(mut self, fit: Fit) -> Result<Self, String> {
        self.input.fit = fit;
        self.validate()
            .map_err(|e| format!("--fit {}: {e}", fit.name()))?;
        Ok(self)
    }

    /// Parse and validate TOML text; the error names the offending field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let desc: ModelDescription =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        desc.validate()?;
        Ok(desc)
    }

    /// Check every field; also after `--fit` overrides the description's fit ([`Self::with_fit`]).
    fn validate(&self) -> Result<(), String> {
        let i = &self.input;
        if i.size[0] == 0 || i.size[1] == 0 {
            return Err(format!("input.size: {:?} must be positive", i.size));
        }
        if i.fit == Fit::Crop && i.resize < i.size[0].max(i.size[1]) {
            return Err(format!(
                "input.resize: {} is smaller than the crop {}×{}: the crop would leave the image",
                i.resize, i.size[0], i.size[1]
            ));
        }
        if let Some([x, y, w, h]) = i.roi {
            if w == 0 || h == 0 {
                return Err(format!(
                    "input.roi: [{x}, {y}, {w}, {h}] has an empty width or height"
                ));
            }
        }
        for (c, &s) in i.std.iter().enumerate() {
            if !(s.is_finite() && s > 0.0) {
                return Err(format!("input.std[{c}]: {s} must be a positive number"));
            }
        }
        if i.mean.iter().any(|m| !m.is_finite()) {
            return Err(format!("input.mean: {:?} must be finite", i.mean));
        }
        let f = &self.features;
        if f.grid[0] == 0 || f.grid[1] == 0 {
            return Err(format!("features.grid: {:?} must be positive", f.grid));
        }
        if f.channels == 0 {
            return Err("features.channels: must be positive".into());
        }
        if f.layout == Layout::Maps && f.prefix_tokens != 0 {
            return Err("features.prefix_tokens: only meaningful with layout = \"tokens\"".into());
        }
        if self.taps.is_empty() {
            return Err("taps: at least one tap is needed".into());
        }
        for (k, t) in self.taps.iter().enumerate() {
            if t.level != k + 1 {
                return Err(format!(
                    "taps[{k}].level: {} (levels must be 1, 2, … in order)",
                    t.level
                ));
            }
            if t.output.is_empty() {
                return Err(format!("taps[{k}].output: empty"));
            }
        }
        if !(self.score.sigma.is_finite() && self.score.sigma > 0.0) {
            return Err(format!(
                "score.sigma: {} must be positive",
                self.score.sigma
            ));
        }
        self.norm_form()?;
        if let Some(levels) = &self.score.levels {
            check_levels(levels, self.taps.len()).map_err(|e| format!("score.levels: {e}"))?;
        }
        Ok(())
    }

    /// The FeatureNorm form named by `score.norm`.
    pub fn norm_form(&self) -> Result<edge_ad_kernels::NormForm, String> {
        match self.score.norm.as_str() {
            "code" => Ok(edge_ad_kernels::NormForm::Code),
            "paper" => Ok(edge_ad_kernels::NormForm::Paper),
            other => Err(format!(
                "score.norm: `{other}` (expected \"code\" or \"paper\")"
            )),
        }
    }

    /// The levels (0-based tap indices) calibration scores by default: `score.levels`, or all.
    pub fn default_levels(&self) -> Vec<usize> {
        match &self.score.levels {
            Some(l) => l.iter().map(|l| l - 1).collect(),
            None => (0..self.taps.len()).collect(),
        }
    }

    /// Positions per level (`h·w`).
    pub fn positions(&self) -> usize {
        self.features.grid[0] * self.features.grid[1]
    }
}

/// Check 1-based level numbers against a model of `taps` levels: non-empty, each in `1..=taps`,
/// strictly increasing.
pub fn check_levels(levels: &[usize], taps: usize) -> Result<(), String> {
    if levels.is_empty() {
        return Err("no level given".into());
    }
    if let Some(l) = levels.iter().find(|&&l| l == 0 || l > taps) {
        return Err(format!(
            "level {l} does not exist: the model has levels 1 to {taps}"
        ));
    }
    if levels.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("{levels:?} must be strictly increasing"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
onnx = "m.onnx"
[input]
size = [224, 224]
resize = 224
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[features]
layout = "tokens"
prefix_tokens = 1
grid = [16, 16]
channels = 384
[[taps]]
level = 1
output = "a"
"#;

    #[test]
    fn good_description_parses_with_defaults() {
        let d = ModelDescription::parse(GOOD).unwrap();
        assert_eq!(d.input.fit, Fit::Crop);
        assert_eq!(d.score.sigma, 4.0);
        assert_eq!(d.positions(), 256);
    }

    #[test]
    fn missing_field_is_named() {
        let e = ModelDescription::parse(&GOOD.replace("channels = 384\n", "")).unwrap_err();
        assert!(e.contains("channels"), "{e}");
    }

    #[test]
    fn wrong_type_and_unknown_field_are_named() {
        let e =
            ModelDescription::parse(&GOOD.replace("resize = 224", "resize = \"big\"")).unwrap_err();
        assert!(e.contains("resize"), "{e}");
        let e = ModelDescription::parse(&GOOD.replace("resize = 224", "resize = 224\nsqueeze = 1"))
            .unwrap_err();
        assert!(e.contains("squeeze"), "{e}");
    }

    #[test]
    fn semantic_errors_are_named() {
        let e = ModelDescription::parse(&GOOD.replace("resize = 224", "resize = 100")).unwrap_err();
        assert!(e.starts_with("input.resize"), "{e}");
        let e = ModelDescription::parse(&GOOD.replace("level = 1", "level = 2")).unwrap_err();
        assert!(e.starts_with("taps[0].level"), "{e}");
        let e = ModelDescription::parse(&GOOD.replace("0.229,", "0.0,")).unwrap_err();
        assert!(e.starts_with("input.std[0]"), "{e}");
    }
}
