//! Lambda: `GET /workspaces/{id}/plugins/{name}/download?source=<src>`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    // S3, SSM, EC2 and https (a remote source is fetched and staged):
    // no host or queue client is linked in.
    plugin_delivery::app::serve_with(
        plugin_delivery::App::for_downloads,
        plugin_delivery::entry::api::download,
    )
    .await
}
