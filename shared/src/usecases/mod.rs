//! The use cases: what the API and the events ask for, written against the
//! ports (`crate::ports`) and the domain only, so every rule here can be
//! unit-tested on the in-memory adapters.
//!
//! - `install`: install, uninstall and download of one plugin (API).
//! - `query`: the read side (desired state, registry, compatibility, records).
//! - `access`: whose a workspace is, and whether the caller may act on it.
//! - `allowlist`: the org allowlist and its gate.
//! - `background`: API operations that outlast the deadline (202 + queue).
//! - `reinstall`, `repair`, `rollout`: putting hosts in line with their
//!   desired state (EventBridge).
//! - `sweep`: retention of staged archives (the schedule).
//! - `resolve`, `state`, `record`: steps the others share (fetch and stage a
//!   plugin, change a desired state, keep an operation record).

pub mod access;
pub mod allowlist;
pub mod background;
pub mod install;
pub mod query;
pub mod record;
pub mod reinstall;
pub mod repair;
pub mod resolve;
pub mod rollout;
pub mod state;
pub mod sweep;

#[cfg(test)]
mod tests;
