//! edge-ad calibration: bank files, reference selection, thresholds and metrics.
//!
//! Empty until the product-loop issue lands the bank file format; the crate exists so the
//! workspace has the design card's layout from the start.
