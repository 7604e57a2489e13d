//! edge-ad calibration: the bank file, thresholds and the field's metrics.
//!
//! - [`bankfile`]: the on-disk bank (versioned header, identities, per-level features, threshold,
//!   checksum), written atomically;
//! - [`threshold`]: rules that turn normal scores into a decision threshold;
//! - [`aligned`]: semantic-aligned per-frame references (spec §7.1);
//! - [`select`]: reference selection (first, random, k-means);
//! - [`metrics`]: image and pixel AUROC, AUPRO, F1-max.

pub mod aligned;
pub mod bankfile;
pub mod bankset;
pub mod metrics;
pub mod select;
pub mod threshold;

pub use bankfile::{BankFile, BankFileError, BankHeader, Identity, LevelData, LevelInfo};
pub use bankset::BankSet;
pub use select::Selection;
pub use threshold::{DefectStats, Threshold, ThresholdRule};
