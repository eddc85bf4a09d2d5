//! Plugin Delivery: install, uninstall and list agent plugins on EC2 workspaces.
//!
//! Hexagonal layout: the domain (`plugin`, `archive`, `ops`) works over small
//! port traits (`store`, `fleet`, `transport`); AWS and SSH adapters implement
//! them; `api` is the API Gateway entrypoint; `app` wires real adapters.

pub mod api;
pub mod app;
pub mod archive;
pub mod background;
pub mod catalog;
pub mod config;
pub mod deadline;
pub mod error;
pub mod events;
pub mod fetch;
pub mod fleet;
pub mod hostscript;
pub mod intake;
pub mod ops;
pub mod plugin;
pub mod reconcile;
pub mod records;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod transport;

pub use app::App;
pub use config::Config;
pub use error::{Error, ErrorKind};
