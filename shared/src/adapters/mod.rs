//! Adapters: the ports implemented for the real world (S3, EC2, EC2
//! Instance Connect + SSH, SSM Run Command and Parameter Store, SQS, https,
//! JWT verification) and in memory
//! (`memory`: unit tests of the use cases and the fleet simulation).
//!
//! Both host transports run the same embedded host script
//! (`domain::hostscript`), so results and guarantees cannot drift apart:
//! `ssh` sends the archive on stdin, `ssm` has the host download it from a
//! presigned URL; `by_access` picks one per host.

pub mod absent;
pub mod aws;
pub mod by_access;
pub mod clock;
pub mod credentials;
pub mod ec2;
pub mod https;
pub mod jwt;
pub mod memory;
pub mod s3;
pub mod sqs;
pub mod ssh;
pub mod ssm;
pub mod tmp;
