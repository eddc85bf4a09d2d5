//! Lambda: `DELETE /workspaces/{id}/plugins/{name}`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    plugin_delivery::app::serve(plugin_delivery::entry::api::uninstall).await
}
