//! The entrypoints: an event in (API Gateway request, EventBridge event,
//! SQS job), a use case called, a response or invocation result out. Only
//! here do Lambda's event shapes appear.

pub mod api;
pub mod events;
