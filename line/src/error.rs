//! The line's error type: why `edge-ad run` could not start. Every variant names the file, the
//! config field or the device it is about.

use std::path::PathBuf;

/// Errors of loading the line config and starting the daemon (nothing runs after one).
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The config file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The config is invalid; the message names the field and the value.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A file or device the config names could not be opened.
    #[error("{field} {}: {source}", path.display())]
    Open {
        /// The config field (`model.bank`, `log.results`, …).
        field: &'static str,
        /// The file or device.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The source folder has no image.
    #[error("source.path {}: no image files", path.display())]
    NoImages {
        /// The folder.
        path: PathBuf,
    },
    /// The Modbus TCP address could not be bound.
    #[error("modbus_tcp.bind {bind}: {source}")]
    Bind {
        /// The address.
        bind: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A GPIO pin could not be resolved.
    #[error("gpio {line}: {source}")]
    Gpio {
        /// The output or input.
        line: String,
        /// Why.
        source: crate::gpio::GpioError,
    },
    /// Model, bank or images (the inspection library's errors name their files).
    #[error(transparent)]
    Runtime(#[from] edge_ad::Error),
    /// A product's bank could not be used (another model, fit or projector; unreadable).
    #[error("product[{index}] (id {id}, {name}): {source}")]
    Product {
        /// Its place among the `[[product]]` entries.
        index: usize,
        /// Its id.
        id: u16,
        /// Its name.
        name: String,
        /// What the inspection library said (it names the file).
        source: Box<edge_ad::Error>,
    },
    /// The arbiter thread panicked (a bug; the process exits non-zero).
    #[error("the arbiter thread panicked")]
    ArbiterPanicked,
}

/// Result with [`LineError`].
pub type Result<T, E = LineError> = std::result::Result<T, E>;
