//! The line (line-side.md): triggers in, verdicts out to the PLC, and the fail-safe rule that a
//! part is accepted only when edge-ad positively said OK for its tag in time.
//!
//! - [`arbiter`]: tags, the FIFO of parts in flight, deadlines, the state machine;
//! - [`status`]: counters, states and the Modbus register image;
//! - [`modbus`]: Modbus PDU logic, RTU framing, CRCs;
//! - [`server`]: Modbus TCP and RTU servers and the serial ASCII protocol;
//! - [`sinks`]: outputs on their own threads behind bounded queues, the results log;
//! - [`products`]: one bank per product over one model, the verdict per product;
//! - [`archive`]: frames, heatmaps and records of kept parts;
//! - [`config`] and [`daemon`]: `edge-ad run --config line.toml`;
//! - [`camera`], [`pixels`], [`gpio`], [`pinmux`], [`notify`]: V4L2, GPIO, systemd.
//!
//! The inspection itself (model, bank, verdict) is the `edge-ad-runtime` library's; this crate
//! only connects it to a line.

pub mod arbiter;
pub mod archive;
pub mod camera;
pub mod config;
pub mod daemon;
pub mod error;
pub mod gpio;
pub mod modbus;
pub mod notify;
pub mod pinmux;
pub mod pixels;
pub mod products;
pub mod server;
pub mod sinks;
pub mod status;

pub use error::{LineError, Result};
