//! Lambda: `DELETE /workspaces/{id}/plugins/{name}`.

use lambda_http::{run, service_fn, Error, Request};
use plugin_delivery::{api, telemetry, App};

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    // Clients and config are built once per cold start and reused.
    let app: &'static App = Box::leak(Box::new(App::from_env().await?));
    run(service_fn(move |req: Request| async move {
        Ok::<_, Error>(api::uninstall(app, req).await)
    }))
    .await
}
