//! The top of the crate: wires the real adapters (S3, EC2, EC2 Instance
//! Connect + SSH, SSM, SQS, https, JWT) into `Deps` once per cold start, and
//! runs a function's Lambda loop over an entrypoint (`serve_with` for the
//! API functions, `serve_events` for the reinstall function). Each function
//! is wired with the clients it calls and no others, so its binary links no
//! code of the rest: install, uninstall and reinstall get everything
//! (`App::new`, which `serve` and `serve_events` use); list, catalog and
//! operations S3, SSM and EC2 (`App::for_reads`); download those and https
//! (`App::for_downloads`); allowlist S3 and SSM (`App::without_hosts`). The
//! ports a function has no use for refuse (`adapters::absent`).

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;

use crate::adapters::absent::NoHosts;
use crate::adapters::by_access::ByAccess;
use crate::adapters::clock::SystemClock;
use crate::adapters::credentials::SsmCredentials;
use crate::adapters::ec2::Ec2Fleet;
use crate::adapters::https::Remote;
use crate::adapters::jwt::JwtVerifier;
use crate::adapters::s3::S3Store;
use crate::adapters::sqs::SqsHandoff;
use crate::adapters::ssh::{EicKeyPusher, SshTransport};
use crate::adapters::ssm::{SsmSettings, SsmTransport};
use crate::domain::config::Config;
use crate::domain::error::Result;
use crate::entry::events;
use crate::ports::{Deps, Fetcher, Fleet, HostTransport};

pub struct App {
    pub deps: Deps,
}

/// Builds an `App` from the configuration and the SDK's.
pub type Wiring = fn(Config, &aws_config::SdkConfig) -> Result<App>;

impl App {
    pub async fn from_env() -> Result<App> {
        App::from_env_with(App::new).await
    }

    /// `from_env`, wired by `build` (`App::new`, `App::for_reads`, ...).
    pub async fn from_env_with(build: Wiring) -> Result<App> {
        let config = Config::from_env()?;
        // A cold start: whatever an invocation killed at its timeout left
        // in the sandbox's temp space goes now.
        let (n, bytes) = crate::adapters::tmp::remove_leftovers(&std::env::temp_dir());
        if n > 0 {
            tracing::warn!(
                entries = n,
                bytes,
                "removed temp leftovers of an earlier invocation"
            );
        }
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        build(config, &sdk)
    }

    /// Everything: the install, uninstall and reinstall functions.
    pub fn new(config: Config, sdk: &aws_config::SdkConfig) -> Result<App> {
        let mut app = App::with_clients(
            config,
            s3_client(sdk),
            aws_sdk_ec2::Client::new(sdk),
            aws_sdk_ec2instanceconnect::Client::new(sdk),
            aws_sdk_ssm::Client::new(sdk),
        )?;
        app.with_queue(aws_sdk_sqs::Client::new(sdk));
        Ok(app)
    }

    /// For a function that never reaches a workspace (the allowlist
    /// function): S3 and SSM (the token keys) only.
    pub fn without_hosts(config: Config, sdk: &aws_config::SdkConfig) -> Result<App> {
        Ok(App::without_hosts_with_clients(
            config,
            s3_client(sdk),
            aws_sdk_ssm::Client::new(sdk),
        ))
    }

    pub fn without_hosts_with_clients(
        config: Config,
        s3: aws_sdk_s3::Client,
        ssm: aws_sdk_ssm::Client,
    ) -> App {
        let none = Arc::new(NoHosts);
        let store = Arc::new(S3Store::new(s3, config.bucket.clone()));
        App::assemble(config, store, ssm, none.clone(), none.clone(), none)
    }

    /// For a function that reads about workspaces but never contacts
    /// their hosts or a source (list, catalog, operations): S3, SSM and
    /// EC2 (which workspace is whose).
    pub fn for_reads(config: Config, sdk: &aws_config::SdkConfig) -> Result<App> {
        Ok(App::for_reads_with_clients(
            config,
            s3_client(sdk),
            aws_sdk_ec2::Client::new(sdk),
            aws_sdk_ssm::Client::new(sdk),
        ))
    }

    pub fn for_reads_with_clients(
        config: Config,
        s3: aws_sdk_s3::Client,
        ec2: aws_sdk_ec2::Client,
        ssm: aws_sdk_ssm::Client,
    ) -> App {
        let none = Arc::new(NoHosts);
        let store = Arc::new(S3Store::new(s3, config.bucket.clone()));
        let fleet = fleet(&config, ec2);
        App::assemble(config, store, ssm, fleet, none.clone(), none)
    }

    /// For the download function: `for_reads`, and the https client that
    /// fetches a remote source to stage it. No host is contacted.
    pub fn for_downloads(config: Config, sdk: &aws_config::SdkConfig) -> Result<App> {
        App::for_downloads_with_clients(
            config,
            s3_client(sdk),
            aws_sdk_ec2::Client::new(sdk),
            aws_sdk_ssm::Client::new(sdk),
        )
    }

    pub fn for_downloads_with_clients(
        config: Config,
        s3: aws_sdk_s3::Client,
        ec2: aws_sdk_ec2::Client,
        ssm: aws_sdk_ssm::Client,
    ) -> Result<App> {
        let fetcher = remote(&config)?;
        let mut app = App::for_reads_with_clients(config, s3, ec2, ssm);
        app.deps.fetcher = fetcher;
        Ok(app)
    }

    /// Enables the 202 path when an operations queue is configured.
    pub fn with_queue(&mut self, sqs: aws_sdk_sqs::Client) {
        if let Some(url) = &self.deps.config.operation_queue_url {
            self.deps.handoff = Some(Arc::new(SqsHandoff::new(sqs, url)));
        }
    }

    pub fn with_clients(
        config: Config,
        s3: aws_sdk_s3::Client,
        ec2: aws_sdk_ec2::Client,
        eic: aws_sdk_ec2instanceconnect::Client,
        ssm: aws_sdk_ssm::Client,
    ) -> Result<App> {
        let store = Arc::new(S3Store::new(s3, config.bucket.clone()));
        let fleet = fleet(&config, ec2);
        let ssh = Arc::new(
            SshTransport::new(
                Arc::new(EicKeyPusher::new(eic)),
                fleet.clone(),
                config.ssh_user.clone(),
                config.command_prefix.clone(),
                config.insecure_ignore_host_key,
                config.connect_timeout,
            )
            .with_reuse(config.ssh_reuse),
        );
        let ssm_transport = Arc::new(SsmTransport::new(
            ssm.clone(),
            store.clone(),
            SsmSettings {
                url_ttl: config.ssm_url_ttl,
                // Within an API request the request's deadline (shorter)
                // rules; this bounds callers without one.
                max_wait: config.operation_timeout,
                // The lock wait plus download, unpack and restart: a backstop
                // only, our own cancel normally comes first.
                execution_timeout: Duration::from_secs(config.lock_wait_secs + 120),
                delivery_timeout: Duration::from_secs(30),
            },
        ));
        let transport = Arc::new(ByAccess {
            ssh,
            ssm: ssm_transport,
        });
        let fetcher = remote(&config)?;
        Ok(App::assemble(config, store, ssm, fleet, transport, fetcher))
    }

    /// What every wiring shares: S3 holds the registry, archives, state,
    /// allowlists and records; SSM the orgs' credentials and the token keys.
    fn assemble(
        config: Config,
        store: Arc<S3Store>,
        ssm: aws_sdk_ssm::Client,
        fleet: Arc<dyn Fleet>,
        transport: Arc<dyn HostTransport>,
        fetcher: Arc<dyn Fetcher>,
    ) -> App {
        let credentials = Arc::new(SsmCredentials::new(
            ssm.clone(),
            &config.org_credentials_path,
        ));
        let auth = Arc::new(JwtVerifier::new(config.tokens.clone(), ssm));
        App {
            deps: Deps {
                config: Arc::new(config),
                registry: store.clone(),
                archives: store.clone(),
                state: store.clone(),
                fleet,
                transport,
                allowlists: store.clone(),
                records: store,
                fetcher,
                credentials,
                auth,
                clock: Arc::new(SystemClock),
                handoff: None,
                recent: Default::default(),
            },
        }
    }
}

fn fleet(config: &Config, ec2: aws_sdk_ec2::Client) -> Arc<Ec2Fleet> {
    Arc::new(Ec2Fleet::new(
        ec2,
        config.ssh_port,
        config.address_tag.clone(),
        config.default_access,
    ))
}

fn remote(config: &Config) -> Result<Arc<Remote>> {
    Ok(Arc::new(Remote::new(
        &config.github_api,
        config.extra_ca_pem.as_deref(),
        config.fetch_timeout,
        config.fetch_policy.clone(),
    )?))
}

/// The S3 client; local S3 stand-ins serve buckets by path, not by
/// virtual host.
fn s3_client(sdk: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    let local_s3 = sdk.endpoint_url().is_some()
        || ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .iter()
            .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()));
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(local_s3)
            .build(),
    )
}

/// The whole `main` of a function: logging, the app built once per cold
/// start (clients and config are reused across invocations), the runtime loop.
pub async fn serve<F, Fut>(handler: F) -> Result<(), lambda_http::Error>
where
    F: Fn(&'static Deps, lambda_http::Request) -> Fut,
    Fut: std::future::Future<Output = lambda_http::Response<lambda_http::Body>> + Send,
{
    serve_with(App::new, handler).await
}

/// `serve`, with the app wired by `build`.
pub async fn serve_with<F, Fut>(build: Wiring, handler: F) -> Result<(), lambda_http::Error>
where
    F: Fn(&'static Deps, lambda_http::Request) -> Fut,
    Fut: std::future::Future<Output = lambda_http::Response<lambda_http::Body>> + Send,
{
    init_logging();
    let app: &'static App = Box::leak(Box::new(App::from_env_with(build).await?));
    lambda_http::run(lambda_http::service_fn(move |req| {
        let resp = handler(&app.deps, req);
        async move { Ok::<_, lambda_http::Error>(resp.await) }
    }))
    .await
}

/// The whole `main` of the reinstall function (EventBridge and the
/// operations queue).
pub async fn serve_events() -> Result<(), lambda_runtime::Error> {
    init_logging();
    let app: &'static App = Box::leak(Box::new(App::from_env().await?));
    lambda_runtime::run(lambda_runtime::service_fn(
        move |ev: lambda_runtime::LambdaEvent<serde_json::Value>| async move {
            // Boxed: the reconcile futures nest deeply; the binary's own
            // future stays small for the compiler's layout queries.
            match Box::pin(events::handle(&app.deps, ev.payload)).await {
                Ok(v) => Ok(v),
                Err(e) => {
                    tracing::error!(error = %e, detail = ?e.detail, "event failed");
                    Err(lambda_runtime::Error::from(e.message))
                }
            }
        },
    ))
    .await
}

/// JSON log lines to stdout, which Lambda ships to CloudWatch.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .without_time()
        .try_init();
}
