//! The runtime's error type: every variant names the file (or field) it is about.

use std::path::PathBuf;

/// Errors of loading a model, reading images or weights, and running the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The model description is invalid; the message names the field.
    #[error("{}: {message}", path.display())]
    ModelDescription {
        /// The TOML file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The ONNX file could not be loaded or prepared.
    #[error("{}: cannot load the ONNX backbone: {message}", path.display())]
    Onnx {
        /// The ONNX file.
        path: PathBuf,
        /// tract's explanation.
        message: String,
    },
    /// A tap names no node output of the ONNX graph.
    #[error("{}: tap `{tap}` is not a node output of this graph; nearest names: {}", path.display(), nearest.join(", "))]
    UnknownTap {
        /// The ONNX file.
        path: PathBuf,
        /// The name asked for.
        tap: String,
        /// The closest existing names (edit distance).
        nearest: Vec<String>,
    },
    /// An image could not be decoded or is unusable.
    #[error("{}: {message}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Projector weights are invalid.
    #[error("{}: projector weights: {source}", path.display())]
    Projector {
        /// The safetensors file.
        path: PathBuf,
        /// The key-level problem.
        source: edge_ad_kernels::KernelError,
    },
    /// The backbone failed on a frame, or produced an unexpected shape.
    #[error("backbone: {0}")]
    Inference(String),
    /// A kernel rejected its inputs (a shape disagreement between bank, model and frame).
    #[error(transparent)]
    Kernel(#[from] edge_ad_kernels::KernelError),
    /// A bank file could not be used.
    #[error(transparent)]
    Bank(#[from] edge_ad_calibration::BankFileError),
    /// The CUDA path was asked for and is unusable, or failed on a frame.
    #[error("GPU: {0}")]
    Gpu(String),
    /// Any other invalid argument.
    #[error("{0}")]
    Invalid(String),
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
