//! The SSH adapter, for hosts with sshd: a fresh ed25519 key per
//! connection, pushed with EC2 Instance Connect (valid 60 s), then an SSH
//! connection verified against the host key the instance published. The
//! archive streams over the command's stdin; an install's command can be
//! started before its plugin is resolved (`start`), and the line naming
//! the plugin then comes first on stdin. A connection whose command
//! ended cleanly is kept a short while (`PLUGIN_SSH_REUSE_SECS`) for the
//! next operation on the same instance: a user adding plugins one after
//! another, or a repair's inventory and then its installs, pay for the key
//! push, handshake and authentication once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_ec2instanceconnect::error::ProvideErrorMetadata;
use russh::client;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::ChannelMsg;
use tokio::io::AsyncWriteExt;

use crate::domain::error::{Error, Result};
use crate::domain::host::Host;
use crate::domain::hostscript::{frame_end, frame_header, HostCommand, HostOutput, FRAME_MAX};
use crate::ports::{Fleet, Growing, HostTransport, Opened, Payload};

/// The ciphers offered, AES-GCM first: EC2 instances and Lambda (x86_64
/// and Graviton) all have AES in hardware, where AES-GCM costs about half
/// the CPU of ChaCha20-Poly1305 (russh's first choice otherwise). Measured
/// on the bench machine with OpenSSH at both ends, 100 MiB cost sshd 0.27
/// core-seconds with aes256-gcm against 0.55 with chacha20-poly1305; the
/// host's decryption is on an install's critical path. Then the rest of
/// russh's defaults, and the AES-128 modes for hosts restricted to them.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_128_CTR,
];

/// Delivers a public key that the host's sshd will accept for a short time.
#[async_trait]
pub trait KeyPusher: Send + Sync {
    async fn push(&self, host: &Host, os_user: &str, public_key: &str) -> Result<()>;
}

/// EC2 Instance Connect `SendSSHPublicKey`.
pub struct EicKeyPusher {
    client: aws_sdk_ec2instanceconnect::Client,
}

impl EicKeyPusher {
    /// Key pushes are rate limited per account: a burst (a fleet rollout)
    /// gets `ThrottlingException`. The SDK's standard retry (exponential
    /// backoff with jitter) is the one retry mechanism; it gets more
    /// attempts and a shorter first delay than the default, so a throttled
    /// push still fits the operation's deadline.
    pub fn new(client: aws_sdk_ec2instanceconnect::Client) -> Self {
        let retry = aws_config::retry::RetryConfig::standard()
            .with_max_attempts(6)
            .with_initial_backoff(Duration::from_millis(100))
            .with_max_backoff(Duration::from_secs(2));
        let conf = client.config().to_builder().retry_config(retry).build();
        EicKeyPusher {
            client: aws_sdk_ec2instanceconnect::Client::from_conf(conf),
        }
    }
}

#[async_trait]
impl KeyPusher for EicKeyPusher {
    async fn push(&self, host: &Host, os_user: &str, public_key: &str) -> Result<()> {
        let mut req = self
            .client
            .send_ssh_public_key()
            .instance_id(&host.instance_id)
            .instance_os_user(os_user)
            .ssh_public_key(public_key);
        if let Some(az) = &host.availability_zone {
            req = req.availability_zone(az);
        }
        let err = match req.send().await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let code = err.code().unwrap_or_default().to_string();
        let detail = format!("SendSSHPublicKey {code}: {err:?}");
        Err(match code.as_str() {
            "EC2InstanceNotFoundException"
            | "EC2InstanceStateInvalidException"
            | "EC2InstanceUnavailableException" => Error::unavailable(
                "the workspace's instance is not reachable through EC2 Instance Connect",
            ),
            "ThrottlingException" => Error::unavailable(
                "EC2 Instance Connect is throttling key pushes; try again shortly",
            ),
            "InvalidArgsException" => Error::host_failed(
                "EC2 Instance Connect refused the key push (check the configured OS user)",
            ),
            _ => crate::adapters::aws::aws_error("EC2 Instance Connect", "SendSSHPublicKey", &err),
        }
        .with_detail(detail))
    }
}

pub struct SshTransport {
    pusher: Arc<dyn KeyPusher>,
    fleet: Arc<dyn Fleet>,
    user: String,
    prefix: String,
    insecure_ignore_host_key: bool,
    connect_timeout: Duration,
    kept: Kept,
}

/// Connections kept for reuse: at most `KEPT_MAX`, each for `keep` after
/// its last command. One is only ever used again for the very host it was
/// made for (instance, address and published host key all equal): the
/// caller of each operation is authorized for that host before it runs.
struct Kept {
    keep: Duration,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    session: client::Handle<Verifier>,
    host: HostKey,
    /// When the connection was authenticated.
    born: Stamp,
    /// When its last command ended.
    idle_since: Stamp,
}

/// What a kept connection must match to be used again.
#[derive(PartialEq, Eq)]
struct HostKey {
    instance: String,
    address: String,
    port: u16,
    published: Option<String>,
}

impl HostKey {
    fn of(host: &Host) -> Self {
        HostKey {
            instance: host.instance_id.clone(),
            address: host.address.clone(),
            port: host.port,
            published: host.published_host_key.clone(),
        }
    }
}

/// A rollout touches many hosts once each: only a few are worth keeping.
const KEPT_MAX: usize = 8;

/// However busy a workspace, a connection is taken for an operation at
/// most this long after its authentication (the key pushed for it lived
/// 60 s).
const KEPT_LIFETIME: Duration = Duration::from_secs(300);

/// A moment on both clocks: a frozen Lambda environment's monotonic clock
/// may not count the time it was frozen.
#[derive(Clone, Copy)]
struct Stamp(Instant, std::time::SystemTime);

impl Stamp {
    fn now() -> Self {
        Stamp(Instant::now(), std::time::SystemTime::now())
    }

    /// The larger of the two clocks' readings.
    fn age(&self) -> Duration {
        let wall = self.1.elapsed().unwrap_or(Duration::MAX);
        self.0.elapsed().max(wall)
    }
}

/// How long a kept connection may take to open a channel before it counts
/// as stale (a host gone silent), and a fresh connection is made instead.
const KEPT_OPEN_WAIT: Duration = Duration::from_secs(2);
/// How long `close` waits for a started command to end once its stdin did.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

impl Kept {
    /// Drops what expired or closed (the caller holds the lock).
    fn prune(&self, idle: &mut Vec<Idle>) {
        idle.retain(|i| {
            i.idle_since.age() < self.keep && i.born.age() < KEPT_LIFETIME && !i.session.is_closed()
        });
    }

    /// A kept connection for `host` and when it was authenticated.
    fn take(&self, host: &Host) -> Option<(client::Handle<Verifier>, Stamp)> {
        let key = HostKey::of(host);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut idle);
        let at = idle.iter().position(|i| i.host == key)?;
        // (Order kept: the first entry is always the one idle longest.)
        let i = idle.remove(at);
        Some((i.session, i.born))
    }

    fn put(&self, host: &Host, session: client::Handle<Verifier>, born: Stamp) {
        if self.keep.is_zero() || session.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut idle);
        if idle.len() >= KEPT_MAX {
            // The oldest goes (dropping the handle ends its connection).
            idle.remove(0);
        }
        idle.push(Idle {
            session,
            host: HostKey::of(host),
            born,
            idle_since: Stamp::now(),
        });
    }
}

impl SshTransport {
    pub fn new(
        pusher: Arc<dyn KeyPusher>,
        fleet: Arc<dyn Fleet>,
        user: impl Into<String>,
        prefix: impl Into<String>,
        insecure_ignore_host_key: bool,
        connect_timeout: Duration,
    ) -> Self {
        SshTransport {
            pusher,
            fleet,
            user: user.into(),
            prefix: prefix.into(),
            insecure_ignore_host_key,
            connect_timeout,
            kept: Kept {
                keep: Duration::ZERO,
                idle: Mutex::new(Vec::new()),
            },
        }
    }

    /// Keep a connection whose command ended cleanly for `keep` (zero: never).
    pub fn with_reuse(mut self, keep: Duration) -> Self {
        self.kept.keep = keep;
        self
    }
}

/// A key that exists only in this process's memory for one operation.
fn ephemeral_key() -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// Accepts the server only if its key is one the instance published.
struct Verifier {
    trusted: Vec<PublicKey>,
    insecure: bool,
    /// Set when the server presented a key we do not trust.
    rejected: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if self.insecure {
            return Ok(true);
        }
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = server else {
            *self.rejected.lock().unwrap() = Some("host certificate (not supported)".into());
            return Ok(false);
        };
        let ok = self.trusted.iter().any(|t| t.key_data() == key.key_data());
        if !ok {
            *self.rejected.lock().unwrap() =
                Some(key.fingerprint(russh::keys::HashAlg::Sha256).to_string());
        }
        Ok(ok)
    }
}

const STDOUT_KEEP: usize = 64 * 1024;
const STDERR_KEEP: usize = 16 * 1024;

/// Keeps the last `cap` bytes: the result line is printed last.
fn keep_tail(buf: &mut Vec<u8>, data: &[u8], cap: usize) {
    buf.extend_from_slice(data);
    if buf.len() > cap {
        let cut = buf.len() - cap;
        buf.drain(..cut);
    }
}

impl SshTransport {
    /// Opens an SSH connection whose host key is one the instance published
    /// (fail closed), ready for authentication.
    async fn connect(&self, host: &Host) -> Result<client::Handle<Verifier>> {
        let keys = if self.insecure_ignore_host_key {
            Vec::new()
        } else {
            self.fleet.host_keys(host).await?
        };
        let trusted: Vec<PublicKey> = keys
            .iter()
            .filter_map(|line| PublicKey::from_openssh(line.trim()).ok())
            .collect();
        if trusted.is_empty() && !self.insecure_ignore_host_key {
            return Err(Error::host_failed(
                "the instance has no published SSH host key, so its identity cannot be verified",
            )
            .with_detail(format!(
                "instance {} published {} unusable key lines",
                host.instance_id,
                keys.len()
            )));
        }

        let rejected = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            trusted,
            insecure: self.insecure_ignore_host_key,
            rejected: Arc::clone(&rejected),
        };
        if self.insecure_ignore_host_key {
            tracing::warn!(instance = %host.instance_id, "host key NOT verified (insecure switch on; local experiments only)");
        }
        let mut config = client::Config {
            inactivity_timeout: Some(Duration::from_secs(120)),
            // A host that vanishes silently is noticed within seconds, not
            // at the operation deadline.
            keepalive_interval: Some(Duration::from_secs(3)),
            keepalive_max: 2,
            nodelay: true,
            ..Default::default()
        };
        config.preferred.cipher = CIPHERS.into();
        // Ask only for the host key types the instance published: a host
        // with both ed25519 and ECDSA keys must present the one we can check.
        if !verifier.trusted.is_empty() {
            let published: Vec<_> = config
                .preferred
                .key
                .iter()
                .filter(|a| verifier.trusted.iter().any(|k| &k.algorithm() == *a))
                .cloned()
                .collect();
            if !published.is_empty() {
                config.preferred.key = published.into();
            }
        }
        let config = Arc::new(config);
        let addr = (host.address.as_str(), host.port);
        let connected = tokio::time::timeout(
            self.connect_timeout,
            client::connect(config, addr, verifier),
        )
        .await;
        match connected {
            Err(_) => Err(
                Error::unavailable("the workspace's host did not answer on SSH in time")
                    .with_detail(format!("connect {}:{} timed out", host.address, host.port)),
            ),
            Ok(Err(e)) => {
                if let Some(fp) = rejected.lock().unwrap().take() {
                    return Err(Error::host_failed(
                        "the host's SSH key does not match the key published for the instance; refusing to connect",
                    )
                    .with_detail(format!("instance {} presented {fp}", host.instance_id)));
                }
                Err(
                    Error::unavailable("the workspace's host is unreachable over SSH")
                        .with_detail(format!("connect {}:{}: {e:?}", host.address, host.port)),
                )
            }
            Ok(Ok(s)) => Ok(s),
        }
    }
}

/// An authenticated session made ahead of its command (`open`), and the
/// command begun on it ahead of its stdin, if any (`start`).
struct SshOpened {
    session: client::Handle<Verifier>,
    instance: String,
    t0: Instant,
    connect_ms: u64,
    auth_ms: u64,
    /// A kept connection (no key push, no handshake this time).
    reused: bool,
    /// When it was authenticated.
    born: Stamp,
    /// The command `start` began on it, waiting for its stdin.
    started: Option<Started>,
}

/// A command started ahead of its stdin (`HostTransport::start`).
struct Started {
    channel: russh::Channel<client::Msg>,
    /// Its arguments: `run_opened` checks they are those of the command it
    /// was asked to run, naming its plugin on stdin.
    args: Vec<String>,
    ready_ms: u64,
    run_start: Instant,
}

impl SshTransport {
    /// An authenticated session for `host`: a kept one, else a new one,
    /// timed from now.
    async fn opened(&self, host: &Host) -> Result<SshOpened> {
        let t0 = Instant::now();
        if let Some((session, born)) = self.kept.take(host) {
            return Ok(SshOpened {
                session,
                instance: host.instance_id.clone(),
                t0,
                connect_ms: 0,
                auth_ms: 0,
                reused: true,
                born,
                started: None,
            });
        }
        self.fresh(host, t0).await
    }

    /// What `open` (or `start`) made for this host, else a new session.
    async fn ready(&self, opened: Option<Opened>, host: &Host) -> Result<SshOpened> {
        let ready = opened
            .and_then(|o| o.0.downcast::<SshOpened>().ok())
            .filter(|o| o.instance == host.instance_id);
        match ready {
            Some(o) => Ok(*o),
            None => self.opened(host).await,
        }
    }

    /// `cmd` running in a new channel of `opened` (a kept connection gone
    /// stale is replaced by a new one first: nothing ran on it yet). With
    /// when the session was ready (ms since its `t0`) and the command began.
    async fn exec(
        &self,
        opened: &mut SshOpened,
        host: &Host,
        cmd: &HostCommand,
    ) -> Result<(russh::Channel<client::Msg>, u64, Instant)> {
        let ready_ms = opened.t0.elapsed().as_millis() as u64;
        let run_start = Instant::now();
        let channel = if opened.reused {
            let open = opened.session.channel_open_session();
            match tokio::time::timeout(KEPT_OPEN_WAIT, open).await {
                Ok(Ok(c)) => c,
                stale => {
                    tracing::debug!(instance = %host.instance_id, ok = stale.is_ok(), "kept SSH connection is stale; connecting again");
                    *opened = self.fresh(host, opened.t0).await?;
                    opened.session.channel_open_session().await.map_err(lost)?
                }
            }
        } else {
            opened.session.channel_open_session().await.map_err(lost)?
        };
        // want_reply: if sshd refuses to run the command, a Failure says so.
        channel
            .exec(true, cmd.render(&self.prefix))
            .await
            .map_err(lost)?;
        Ok((channel, ready_ms, run_start))
    }

    /// A new authenticated session for `host`, timed from `t0`.
    async fn fresh(&self, host: &Host, t0: Instant) -> Result<SshOpened> {
        let (session, connect_ms, auth_ms) = self.session(host, t0).await?;
        Ok(SshOpened {
            session,
            instance: host.instance_id.clone(),
            t0,
            connect_ms,
            auth_ms,
            reused: false,
            born: Stamp::now(),
            started: None,
        })
    }

    /// A fresh key pushed with EC2 Instance Connect, beside the connection
    /// (host-key lookup, TCP, key exchange, host-key check): the two are
    /// independent until authentication, so they overlap. An authenticated
    /// session, and when it connected and authenticated (ms since `t0`).
    async fn session(
        &self,
        host: &Host,
        t0: Instant,
    ) -> Result<(client::Handle<Verifier>, u64, u64)> {
        let key = ephemeral_key();
        let public_line = key
            .public_key()
            .to_openssh()
            .map_err(|e| Error::internal(format!("encode public key: {e}")))?;
        let (pushed, session) = tokio::join!(
            self.pusher.push(host, &self.user, &public_line),
            self.connect(host)
        );
        pushed?;
        let mut session = session?;
        let connect_ms = t0.elapsed().as_millis() as u64;
        let auth = session
            .authenticate_publickey(&self.user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .map_err(|e| {
                Error::unavailable("the SSH session to the host failed")
                    .with_detail(format!("auth: {e:?}"))
            })?;
        if !auth.success() {
            return Err(Error::host_failed(format!(
                "the host refused the key pushed through EC2 Instance Connect for OS user {:?}; \
                 a wrong OS user is the usual cause",
                self.user
            ))
            .with_detail(format!(
                "instance {}: publickey auth failed",
                host.instance_id
            )));
        }
        Ok((session, connect_ms, t0.elapsed().as_millis() as u64))
    }
}

fn lost(e: russh::Error) -> Error {
    Error::unavailable("the connection to the host was lost during the operation")
        .with_detail(format!("{e:?}"))
}

/// What a command reads after the line naming its plugin.
enum Feed {
    Nothing,
    /// A whole archive.
    File(tokio::fs::File),
    /// An archive in frames as it is built, its digest last: read from its
    /// file as far as it is written. Closed without the digest, the stream
    /// ends without it (the host publishes nothing).
    Growing(Growing),
}

/// Frames smaller than this wait for more of the archive (each costs the
/// host a `head` process), unless the archive is complete.
const FRAME_MIN: u64 = 4 * 1024 * 1024;

/// Sends a growing archive's bytes in frames as they reach its file, then
/// its digest. The build is never held back: the file takes what the host
/// has not yet.
async fn send_growing(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut growing: Growing,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file: Option<tokio::fs::File> = None;
    let mut sent = 0u64;
    loop {
        let g = growing.borrow_and_update().clone();
        if file.is_none() {
            if let Some(path) = &g.path {
                file = Some(tokio::fs::File::open(path).await?);
            }
        }
        let ready = g.written.saturating_sub(sent);
        if let Some(f) = file
            .as_mut()
            .filter(|_| ready >= FRAME_MIN || (g.end.is_some() && ready > 0))
        {
            let len = ready.min(FRAME_MAX);
            w.write_all(frame_header(len).as_bytes()).await?;
            f.seek(std::io::SeekFrom::Start(sent)).await?;
            // 256 KiB reads so each SSH packet is full-size (32 KiB).
            let mut part = tokio::io::BufReader::with_capacity(256 * 1024, (&mut *f).take(len));
            let copied = tokio::io::copy_buf(&mut part, w).await?;
            if copied != len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the archive's file is shorter than written",
                ));
            }
            sent += len;
            continue;
        }
        if let Some(sha) = &g.end {
            w.write_all(frame_end(sha).as_bytes()).await?;
            return Ok(());
        }
        if growing.changed().await.is_err() {
            // Built no further, and no digest: the host publishes nothing.
            return Ok(());
        }
    }
}

/// Streams the line naming the plugin and the archive (each if any) into
/// the command's stdin, then EOF.
async fn send_stdin(
    tx: russh::ChannelWriteHalf<client::Msg>,
    named: Option<String>,
    feed: Feed,
) -> std::io::Result<()> {
    let mut w = tx.make_writer();
    let copied = async {
        if let Some(line) = named {
            w.write_all(line.as_bytes()).await?;
        }
        match feed {
            Feed::Nothing => {}
            // 256 KiB reads so each SSH packet is full-size (32 KiB).
            Feed::File(f) => {
                tokio::io::copy_buf(
                    &mut tokio::io::BufReader::with_capacity(256 * 1024, f),
                    &mut w,
                )
                .await?;
            }
            Feed::Growing(growing) => send_growing(&mut w, growing).await?,
        }
        Ok(())
    }
    .await;
    // EOF even after a failed copy: the host's digest check then refuses
    // the truncated archive instead of waiting for more.
    let _ = w.shutdown().await;
    copied
}

/// The command's output, exit status or signal, until the channel closes.
async fn collect_output(mut rx: russh::ChannelReadHalf) -> HostOutput {
    let mut out = HostOutput::default();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(msg) = rx.wait().await {
        match msg {
            ChannelMsg::Data { data } => keep_tail(&mut stdout, &data, STDOUT_KEEP),
            ChannelMsg::ExtendedData { data, ext: 1 } => keep_tail(&mut stderr, &data, STDERR_KEEP),
            ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                out.exit_signal = Some(format!("{signal_name:?}"))
            }
            // sshd refused to run the command at all.
            ChannelMsg::Failure => out.exec_refused = true,
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    out.stdout = String::from_utf8_lossy(&stdout).into_owned();
    out.stderr = String::from_utf8_lossy(&stderr).into_owned();
    out
}

#[async_trait]
impl HostTransport for SshTransport {
    async fn run(
        &self,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        self.run_opened(None, host, cmd, payload).await
    }

    async fn open(&self, host: &Host) -> Result<Option<Opened>> {
        Ok(Some(Opened(Box::new(self.opened(host).await?))))
    }

    async fn start(
        &self,
        opened: Option<Opened>,
        host: &Host,
        cmd: &HostCommand,
    ) -> Result<Option<Opened>> {
        let mut opened = self.ready(opened, host).await?;
        let (channel, ready_ms, run_start) = self.exec(&mut opened, host, cmd).await?;
        opened.started = Some(Started {
            channel,
            args: cmd.args.clone(),
            ready_ms,
            run_start,
        });
        Ok(Some(Opened(Box::new(opened))))
    }

    async fn close(&self, opened: Opened, host: &Host) {
        let Ok(opened) = opened.0.downcast::<SshOpened>() else {
            return;
        };
        let SshOpened {
            session,
            instance,
            started,
            born,
            ..
        } = *opened;
        // A started command: its stdin ends with no line, so it ends (a
        // usage error, nothing written); its exit leaves the connection clean.
        let clean = match started {
            None => true,
            Some(s) => {
                let (rx, tx) = s.channel.split();
                let ended = async {
                    let _ = tx.eof().await;
                    collect_output(rx).await
                };
                matches!(tokio::time::timeout(CLOSE_WAIT, ended).await, Ok(out) if out.exit_status.is_some())
            }
        };
        if clean && instance == host.instance_id && !self.kept.keep.is_zero() {
            self.kept.put(host, session, born);
        } else {
            let _ = session
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }

    async fn run_opened(
        &self,
        opened: Option<Opened>,
        host: &Host,
        cmd: &HostCommand,
        payload: Option<&Payload<'_>>,
    ) -> Result<HostOutput> {
        let feed = match payload {
            Some(p) => Feed::File(
                tokio::fs::File::open(p.path)
                    .await
                    .map_err(|e| Error::internal(format!("open archive: {e}")))?,
            ),
            None => Feed::Nothing,
        };
        // A command started ahead must be this one, naming its plugin on
        // stdin; run anew, it names it in its arguments.
        self.run_fed(opened, host, cmd.named_on_stdin(), (cmd, None), feed)
            .await
    }

    async fn run_framed(
        &self,
        opened: Option<Opened>,
        host: &Host,
        started: &HostCommand,
        name: &str,
        growing: Growing,
    ) -> Result<HostOutput> {
        let about = growing.borrow().about;
        let line = started
            .framed_line(name, about)
            .ok_or_else(|| Error::internal("run_framed takes an install named on stdin"))?;
        let early = Some((started.clone(), line.clone()));
        self.run_fed(
            opened,
            host,
            early,
            (started, Some(line)),
            Feed::Growing(growing),
        )
        .await
    }
}

impl SshTransport {
    /// Runs a command and feeds it: the one `start` began on `opened`, if
    /// it has the arguments of `early` (which then gives the line naming
    /// its plugin; else it is ended unsent, as `close` ends it, and the run
    /// refused), or else `fresh`, with its line if it has one.
    async fn run_fed(
        &self,
        opened: Option<Opened>,
        host: &Host,
        early: Option<(HostCommand, String)>,
        fresh: (&HostCommand, Option<String>),
        feed: Feed,
    ) -> Result<HostOutput> {
        // A session opened (or a command started) for this host, else a
        // new session.
        let mut opened = self.ready(opened, host).await?;
        // How long a command started ahead waited for its plugin.
        let mut waited_ms = 0;
        let (channel, ready_ms, run_start, named) = match opened.started.take() {
            // Its run is timed from the line naming the plugin.
            Some(s) => match early {
                Some((early, line)) if early.args == s.args => {
                    waited_ms = s.run_start.elapsed().as_millis() as u64;
                    (s.channel, s.ready_ms, Instant::now(), Some(line))
                }
                _ => {
                    opened.started = Some(s);
                    self.close(Opened(Box::new(opened)), host).await;
                    return Err(Error::internal(format!(
                        "the command started ahead is not {}",
                        fresh.0.summary()
                    )));
                }
            },
            None => {
                let (c, ready_ms, run_start) = self.exec(&mut opened, host, fresh.0).await?;
                (c, ready_ms, run_start, fresh.1)
            }
        };
        let SshOpened {
            session,
            t0,
            connect_ms,
            auth_ms,
            reused,
            born,
            ..
        } = opened;
        let (rx, tx) = channel.split();
        // Stream stdin and collect output in one future: if the operation
        // is cancelled (its deadline) both stop with the session, and
        // nothing keeps feeding the host behind the caller's back.
        let write = send_stdin(tx, named, feed);
        let read = collect_output(rx);
        tokio::pin!(write, read);
        let mut writing = true;
        let out = loop {
            tokio::select! {
                // The script may finish without reading (`unchanged`): a
                // failed write is then expected, and the output decides.
                r = &mut write, if writing => {
                    writing = false;
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "stdin stream ended early");
                    }
                }
                out = &mut read => break out,
            }
        };
        // Kept for the next operation on this host only after a clean end
        // (an exit status, the channel closed); otherwise closed now.
        if out.exit_status.is_some() && !self.kept.keep.is_zero() {
            self.kept.put(host, session, born);
        } else {
            let _ = session
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
        tracing::debug!(
            instance = %host.instance_id,
            reused,
            waited_ms,
            connect_ms,
            auth_ms,
            ready_ms,
            run_ms = run_start.elapsed().as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "ssh timings"
        );
        Ok(out)
    }
}
