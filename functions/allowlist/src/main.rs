//! Lambda: `GET` and `PUT /orgs/{id}/plugins/allowlist`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    plugin_delivery::app::serve(plugin_delivery::entry::api::allowlist).await
}
