//! How CLI commands reach a node: its URL (`--node`, `TROUPE_URL`, or the default local
//! address) and a token (`--token`, `TROUPE_TOKEN`, or the admin token in the data directory).
//! Commands that only use open routes (`troupe health`) need no token.
//!
//! The admin token of the data directory is never sent to a node that is not on a loopback
//! address unless the data directory was named (`--data-dir`, `TROUPE_DATA_DIR`): the default
//! directory's token belongs to this machine's node, and a `--node` elsewhere (over plain http)
//! must not receive it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::StatusCode;

use crate::auth::read_admin_token;
use crate::config::default_data_dir;

/// Options shared by every command that talks to a node.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Node URL (`http://HOST:PORT`; a bare `HOST:PORT` means `http://HOST:PORT`).
    #[arg(
        long = "node",
        env = "TROUPE_URL",
        default_value = "http://127.0.0.1:7070"
    )]
    pub url: String,
    /// Bearer token (default: the admin token in the node's data directory, sent only to a
    /// loopback node unless --data-dir / TROUPE_DATA_DIR names the directory).
    #[arg(long, env = "TROUPE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The node's data directory, to read its admin token from.
    #[arg(long, env = "TROUPE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Seconds to wait for the node's answer (default 30; 10 for `troupe health`). A followed
    /// stream is waited for this long to open, and then as long as it runs.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout: Option<u64>,
}

/// How long a command waits for a node's answer unless `--request-timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one node.
pub struct NodeClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// How long a request may wait for the node's answer.
    timeout: Duration,
    /// Whether `timeout` came from `--request-timeout` (a command's own default does not replace it).
    timeout_given: bool,
}

impl NodeClient {
    /// Resolves the URL and the token; fails when no token can be found.
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let token = match &args.token {
            Some(token) if token.trim().is_empty() => bail!(
                "the token given with --token / TROUPE_TOKEN is empty; give the token, or unset \
                 TROUPE_TOKEN to use the admin token of the node's data directory"
            ),
            Some(token) => token.clone(),
            None => {
                let data_dir = admin_token_dir(&node_url(&args.url)?, args.data_dir.as_deref())?;
                data_dir_token(&data_dir)?
            }
        };
        Self::build(args, Some(token))
    }

    /// Resolves the URL only, for routes that are open (`/v1/health`): sends no token.
    pub fn anonymous(args: &ClientArgs) -> anyhow::Result<Self> {
        Self::build(args, None)
    }

    fn build(args: &ClientArgs, token: Option<String>) -> anyhow::Result<Self> {
        crate::tls::install_default_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            base: node_url(&args.url)?,
            token,
            timeout: args
                .request_timeout
                .map_or(DEFAULT_TIMEOUT, Duration::from_secs),
            timeout_given: args.request_timeout.is_some(),
        })
    }

    /// Waits `timeout` for answers unless `--request-timeout` was given.
    pub fn default_timeout(mut self, timeout: Duration) -> Self {
        if !self.timeout_given {
            self.timeout = timeout;
        }
        self
    }

    /// The node's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A GET request with the token.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.method(reqwest::Method::GET, path)
    }

    /// A request with the token, if this client has one.
    pub fn method(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request whose answer is read whole: the answer, body included, must come
    /// within the timeout.
    pub async fn fetch(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        self.send(request.timeout(self.timeout)).await
    }

    /// Sends a request and waits, up to the timeout, for the answer to begin (a stream then
    /// runs as long as it does); turns transport failures into a message that says what to
    /// check, with their cause.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let sent = tokio::time::timeout(self.timeout, request.send()).await;
        match sent {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) if error.is_connect() => {
                let cause = causes(&error);
                let hint = if cause.contains("dns error") {
                    "check the host name, or use the node's IP address"
                } else if self.base.starts_with("https://") && !cause.contains("tcp connect") {
                    "the TLS handshake failed: a node serves plain http unless a proxy in front \
                     of it does TLS, so try http://"
                } else {
                    "is it running? (start one with `troupe node`, or point --node / TROUPE_URL \
                     at it)"
                };
                Err(anyhow::anyhow!(
                    "cannot reach a node at {}: {cause}; {hint}",
                    self.base
                ))
            }
            Ok(Err(error)) if error.is_timeout() => Err(self.no_answer()),
            Ok(Err(error)) => Err(anyhow::anyhow!(
                "request to {} failed: {}",
                self.base,
                causes(&error)
            )),
            Err(_) => Err(self.no_answer()),
        }
    }

    fn no_answer(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "the node at {} did not answer within {}s (is it overloaded or stuck? `--request-timeout \
             SECS` waits longer)",
            self.base,
            self.timeout.as_secs()
        )
    }
}

/// An error's causes, innermost last, each once: what actually went wrong under reqwest's
/// "error sending request" (connection refused, a DNS failure, a TLS alert…).
fn causes(error: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(current) = cause {
        let text = current.to_string();
        // hyper's wrapper says nothing its cause does not.
        if !text.starts_with("client error (") && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        cause = current.source();
    }
    if parts.is_empty() {
        return error.to_string();
    }
    parts.join(": ")
}

/// The node's base URL from `--node`: `http://` is assumed when no scheme is given (the other
/// address flags take `HOST:PORT`); anything that is then not an http(s) URL is refused, saying
/// what is expected.
fn node_url(given: &str) -> anyhow::Result<String> {
    let given = given.trim().trim_end_matches('/');
    let url = if given.contains("://") {
        given.to_owned()
    } else {
        format!("http://{given}")
    };
    match reqwest::Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => Ok(url),
        _ => bail!("--node / TROUPE_URL {given:?} is not a node's address: use http://HOST:PORT"),
    }
}

/// The data directory whose admin token may be sent to the node at `base` (a URL from
/// [`node_url`]) when no token was given: the one named with `--data-dir` / `TROUPE_DATA_DIR`,
/// to any node; else the default one, to a node on a loopback address only.
fn admin_token_dir(base: &str, named: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = named {
        return Ok(dir.to_owned());
    }
    let url = reqwest::Url::parse(base).context("the node's URL")?;
    if is_loopback(&url) {
        return Ok(default_data_dir());
    }
    bail!(
        "no token for {base}: it is not a loopback address, and the CLI sends the admin token of \
         this machine's data directory only to a node on this machine; pass the node's token \
         with --token / TROUPE_TOKEN (or name the data directory whose admin token it takes with \
         --data-dir / TROUPE_DATA_DIR)"
    )
}

/// The admin token in `data_dir`, or what to do without it.
fn data_dir_token(data_dir: &Path) -> anyhow::Result<String> {
    match read_admin_token(data_dir) {
        Ok(Some(token)) => Ok(token),
        Ok(None) => bail!(
            "no token: {} has none; pass the node's --data-dir (or TROUPE_DATA_DIR) when it runs \
             with one, or a token with --token / TROUPE_TOKEN",
            data_dir.join(crate::auth::ADMIN_TOKEN_FILE).display()
        ),
        Err(error) => {
            bail!("{error}; run as the node's user, or pass a token with --token / TROUPE_TOKEN")
        }
    }
}

/// Whether `url`'s host is this machine: `localhost`, 127.0.0.0/8 or ::1 (also IPv4-mapped).
fn is_loopback(url: &reqwest::Url) -> bool {
    use std::net::IpAddr;
    let Some(host) = url.host_str() else {
        return false;
    };
    // The URL parser has normalised an IP host (`127.1` is `127.0.0.1`); IPv6 is in brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|ip| ip.is_loopback())
        }
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost."),
    }
}

/// Turns an error response (the API's envelope) into a readable error.
pub(super) async fn check(response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    match status {
        StatusCode::UNAUTHORIZED => bail!(
            "the node refused the token: {message} (without --token, the CLI reads the admin \
             token of the data directory given by --data-dir / TROUPE_DATA_DIR, or the default \
             one: pass the node's)"
        ),
        StatusCode::FORBIDDEN => bail!("the token's role is not enough: {message}"),
        _ => bail!("{status}: {message}"),
    }
}

/// The largest event the CLI reads from a node's event stream: a node's largest event (an
/// output event of 64 KiB of text, every character escaped) with room to spare.
const MAX_EVENT_BYTES: usize = 4 << 20;

/// How long a followed stream may stay silent before the CLI takes it for broken (and its
/// command reconnects, resuming where it stopped): four of the node's heartbeats (one every
/// 15 s), so a node that stopped, or a network that drops packets without a word, is noticed.
const STREAM_IDLE: Duration = Duration::from_secs(60);

/// The server-sent events of a response's body, each of at most [`MAX_EVENT_BYTES`]; a body
/// silent for [`STREAM_IDLE`] (or `--request-timeout`, when longer) ends with an error.
pub(super) fn sse_events(
    client: &NodeClient,
    response: reqwest::Response,
) -> impl futures::Stream<Item = Result<crate::sse::Event, crate::sse::ReadError<anyhow::Error>>>
+ Unpin
+ use<> {
    let idle = STREAM_IDLE.max(client.timeout);
    Box::pin(crate::sse::events(
        until_idle(response.bytes_stream(), idle),
        MAX_EVENT_BYTES,
    ))
}

/// The pieces of `body`, ended by an error once none came for `idle`.
fn until_idle<S, E>(
    body: S,
    idle: Duration,
) -> impl futures::Stream<Item = anyhow::Result<bytes::Bytes>> + Unpin
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    E: Into<anyhow::Error>,
{
    use futures::StreamExt as _;
    Box::pin(futures::stream::unfold(
        Some(Box::pin(body)),
        move |body| async move {
            let mut body = body?;
            match tokio::time::timeout(idle, body.next()).await {
                Ok(Some(piece)) => Some((piece.map_err(Into::into), Some(body))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(anyhow::anyhow!(
                        "nothing came from the node for {} s, not even its heartbeat; \
                         taking the stream for broken",
                        idle.as_secs()
                    )),
                    None,
                )),
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    #[tokio::test(start_paused = true)]
    async fn a_stream_silent_for_the_idle_time_ends_with_an_error() {
        let started = tokio::time::Instant::now();
        let pieces = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"data: a\n\n",
        ))])
        .chain(futures::stream::pending());
        let mut body = until_idle(pieces, Duration::from_secs(60));
        assert_eq!(
            body.next().await.unwrap().unwrap(),
            &b"data: a\n\n"[..],
            "what came is passed on"
        );
        let error = body.next().await.unwrap().unwrap_err();
        assert!(
            error
                .to_string()
                .contains("nothing came from the node for 60 s"),
            "{error}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        assert!(body.next().await.is_none(), "nothing after the error");
    }

    #[tokio::test(start_paused = true)]
    async fn each_piece_restarts_the_idle_time() {
        let started = tokio::time::Instant::now();
        let pieces = futures::stream::unfold(0, |sent| async move {
            (sent < 3).then_some(())?;
            tokio::time::sleep(Duration::from_secs(50)).await;
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b": heartbeat\n\n")),
                sent + 1,
            ))
        });
        let got: Vec<_> = until_idle(pieces, Duration::from_secs(60)).collect().await;
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(Result::is_ok), "{got:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(150));
    }

    #[test]
    fn a_node_address_without_a_scheme_is_taken_as_http_and_nonsense_is_refused() {
        assert_eq!(node_url("127.0.0.1:7080").unwrap(), "http://127.0.0.1:7080");
        assert_eq!(node_url("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(node_url("https://h").unwrap(), "https://h");
        for bad in ["ftp://h:1", "a b:c", ""] {
            let error = node_url(bad).unwrap_err().to_string();
            assert!(error.contains("http://HOST:PORT"), "{bad}: {error}");
        }
    }

    /// Regression: a token file the CLI could not read was reported as missing ("has none; pass
    /// --data-dir"), though the data directory had been passed.
    #[test]
    fn an_unreadable_token_says_so_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let error = data_dir_token(dir.path()).unwrap_err().to_string();
        assert!(error.contains("has none"), "{error}");
        std::fs::create_dir(dir.path().join(crate::auth::ADMIN_TOKEN_FILE)).unwrap();
        let error = data_dir_token(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("cannot read the admin token")
                && error.contains("run as the node's user, or pass a token with --token")
                && !error.contains("has none"),
            "{error}"
        );
    }

    /// Regression: without --token the CLI read the default data directory's admin token and
    /// sent it to whatever --node / TROUPE_URL named, over plain http.
    #[test]
    fn the_default_data_dir_token_goes_only_to_a_loopback_node() {
        let default = default_data_dir();
        for local in [
            "127.0.0.1:7070",
            "http://127.1.2.3:80",
            "http://localhost:7070",
            "http://LOCALHOST",
            "http://[::1]:7070",
            "http://[::ffff:127.0.0.1]:7070",
            "https://127.0.0.1",
        ] {
            let base = node_url(local).unwrap();
            assert_eq!(admin_token_dir(&base, None).unwrap(), default, "{local}");
        }
        for remote in [
            "http://10.0.0.5:7070",
            "http://example.com:7070",
            "http://localhost.example.com",
            "http://[2001:db8::1]:7070",
            "http://0.0.0.0:7070",
            "192.168.1.2:7070",
        ] {
            let base = node_url(remote).unwrap();
            let error = admin_token_dir(&base, None).unwrap_err().to_string();
            assert!(
                error.contains("not a loopback address")
                    && error.contains("--token / TROUPE_TOKEN"),
                "{remote}: {error}"
            );
            // A data directory named on purpose is the caller's choice.
            let named = Path::new("/srv/troupe-b");
            assert_eq!(admin_token_dir(&base, Some(named)).unwrap(), named);
        }
    }
}
