//! Lambda: `GET /workspaces/{id}/plugins`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    plugin_delivery::app::serve(plugin_delivery::entry::api::list).await
}
