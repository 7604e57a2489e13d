//! edge-ad boards: board profiles, detection and GPIO pin tables.
//!
//! Empty until the line issue lands board profiles; the crate exists so the workspace has the
//! design card's layout from the start.
