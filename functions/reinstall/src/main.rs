//! Lambda (EventBridge): reinstall a replaced host's plugins, roll a plugin
//! out to the fleet, repair drift on a schedule.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    plugin_delivery::app::serve_events().await
}
