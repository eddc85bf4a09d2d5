//! The clock port on tokio's timer: real waits in Lambda, and virtual ones
//! when a runtime's time is paused (the fleet simulation).

use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::ports::Clock;

pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}
