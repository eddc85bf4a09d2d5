//! Lambda: the canvas's read routes — `GET /plugins`, `GET /plugins/sources`,
//! `GET /workspaces/{id}/plugins/available`, `GET /workspaces/{id}/plugins/compatibility`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    plugin_delivery::app::serve(plugin_delivery::entry::api::catalog).await
}
