//! Lambda: the canvas's read routes — `GET /plugins`, `GET /plugins/sources`,
//! `GET /workspaces/{id}/plugins/available`, `GET /workspaces/{id}/plugins/compatibility`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    // S3, SSM and EC2 only: no host, source or queue client is linked in.
    plugin_delivery::app::serve_with(
        plugin_delivery::App::for_reads,
        plugin_delivery::entry::api::catalog,
    )
    .await
}
