//! edge-ad runtime: the model description, frame preparation, the tract backbone and the one
//! inspection pipeline that every command (calibrate, inspect, bench, demo, the line daemon) uses.

pub mod aligned;
pub mod backbone;
pub mod bench;
pub mod demo;
pub mod error;
pub mod eval;
pub mod heatmap;
pub mod images;
pub mod inspector;
pub mod model;
pub mod pipeline;
pub mod preprocess;
pub mod recognise;
pub mod report;
pub mod synthetic;

pub use error::{Error, Result};
pub use model::{Fit, LoadedDescription, ModelDescription};
pub use pipeline::{Bank, Device, FrameFeatures, Inspection, Pipeline, PipelineOptions, Timings};
pub use preprocess::Rgb8;
