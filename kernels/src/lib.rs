//! Numeric kernels of edge-ad: the CPU reference implementations of every step after the
//! backbone (spec: `adpretrain-inference.md`).
//!
//! - [`residual`]: cosine nearest neighbour in a reference bank and the residual (§3.3);
//! - [`projector`]: the ADPretrain Learnable Key/Value attention projector (§4);
//! - [`featurenorm`]: per-position norm, upsampling, smoothing and the image score (§5);
//! - [`gemm`]: the one matrix product they all stand on;
//! - [`weights`]: the deterministic weight generator of the conformance cases.
//!
//! No I/O: callers hand in bytes and slices. Layout everywhere: features of one level are
//! `positions × channels`, positions row-major over the grid (token order of a ViT).

#[cfg(target_arch = "x86_64")]
pub mod attention_avx512;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod featurenorm;
pub mod gemm;
pub mod projector;
pub mod residual;
#[cfg(target_arch = "x86_64")]
pub mod residual_avx512;
pub mod vmath;
pub mod weights;

pub use featurenorm::{FeatureNorm, NormForm, ScoreWorkspace};
pub use gemm::Par;
pub use projector::{LevelProjector, Projector, ProjectorWorkspace};
pub use residual::{nearest_residual, BankDtype, LevelBank, ResidualWorkspace};

/// What can go wrong inside a kernel or while reading kernel weights.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Inconsistent sizes between inputs (the message gives both).
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A weight the format requires is absent.
    #[error("missing tensor `{key}`")]
    MissingKey {
        /// The state-dict key.
        key: String,
    },
    /// A weight has another shape than the one its key requires.
    #[error("tensor `{key}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        /// The state-dict key.
        key: String,
        /// Shape the model requires.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },
    /// A weight is stored in an unsupported element type.
    #[error("tensor `{key}` has dtype {dtype}; expected F32, BF16 or F16")]
    Dtype {
        /// The state-dict key.
        key: String,
        /// The dtype found.
        dtype: String,
    },
    /// The bytes are not a valid safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Format(String),
}
