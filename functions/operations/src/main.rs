//! Lambda: `GET /workspaces/{id}/plugins/operations` and
//! `GET /workspaces/{id}/plugins/operations/{op_id}`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    plugin_delivery::app::serve(plugin_delivery::entry::api::operations).await
}
