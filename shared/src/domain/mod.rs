//! The domain: plugins, sources, archives, the host script's protocol,
//! operation records, hosts and configuration, and the one error type.
//! Pure rules over plain values; the only I/O is local files (archives and
//! the intake of fetched ones). Nothing here knows about AWS or the network,
//! and nothing here imports from the layers above.

pub mod allowlist;
pub mod archive;
pub mod caller;
pub mod catalog;
pub mod config;
pub mod deadline;
pub mod error;
pub mod gzip;
pub mod host;
pub mod hostscript;
pub mod intake;
pub mod job;
pub mod netguard;
pub mod plugin;
pub mod recent;
pub mod records;
pub mod rollout;
pub mod source;
