//! Lambda: `GET` and `PUT /orgs/{id}/plugins/allowlist`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    // S3 and SSM only: no host, source or queue client is linked in.
    plugin_delivery::app::serve_with(
        plugin_delivery::App::without_hosts,
        plugin_delivery::entry::api::allowlist,
    )
    .await
}
