//! Plugin Delivery: install, uninstall and list agent plugins on EC2 workspaces.
//!
//! The layers, each importing only from those below it:
//!
//! - `domain`: plugins, sources, archives, the host script's protocol,
//!   records, hosts, configuration, the error type; no AWS, no network.
//! - `ports`: the traits the use cases need (stores, fleet, host transport,
//!   hand-off, fetcher, clock) and `Deps`, the bundle of them.
//! - `usecases`: install, uninstall, list, download, allowlists, the
//!   background hand-off, reinstall, repair, rollout, record queries;
//!   written against `ports` only.
//! - `adapters`: the ports implemented on S3, EC2, EC2 Instance Connect +
//!   SSH, SSM, SQS and https, and in memory (`adapters::memory`).
//! - `entry`: API Gateway and EventBridge/SQS events in, use cases called,
//!   responses out.
//! - `app`: wiring real adapters into `Deps` and the functions' `main`.
//!
//! `shared/tests/layers.rs` fails the build's tests when an import points up
//! or two modules import each other.

#[cfg(feature = "runtime")]
pub mod adapters;
#[cfg(feature = "runtime")]
pub mod app;
pub mod domain;
#[cfg(feature = "runtime")]
pub mod entry;
pub mod ports;
pub mod usecases;

#[cfg(feature = "runtime")]
pub use app::App;
pub use domain::config::Config;
pub use domain::error::{Error, ErrorKind, Result};
