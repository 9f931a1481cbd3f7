//! The load-test harness for Tutti (`tutti-load`): scenario files, workload
//! runners that drive the real server through the native client, SLO verdicts and
//! reports (table, JSON, `.hgrm`, SVG). `main.rs` only parses the command line.

pub mod alongside;
pub mod app;
pub mod http;
pub mod outcome;
pub mod procstat;
pub mod progress;
pub mod report;
pub mod run;
pub mod scenario;
pub mod slo;
pub mod stats;
pub mod target;
