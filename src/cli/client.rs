//! How CLI commands reach a node: its URL (`--node`, `TROUPE_URL`, or the default local
//! address) and a token (`--token`, `TROUPE_TOKEN`, or the admin token in the data directory).
//! Commands that only use open routes (`troupe health`) need no token.

use std::path::PathBuf;
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
    /// Bearer token (default: the admin token in the node's data directory).
    #[arg(long, env = "TROUPE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The node's data directory, to read its admin token from.
    #[arg(long, env = "TROUPE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// A connection to one node.
pub struct NodeClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl NodeClient {
    /// Resolves the URL and the token; fails when no token can be found.
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
        let token = match &args.token {
            Some(token) => token.clone(),
            None => read_admin_token(&data_dir).with_context(|| {
                format!(
                    "no token: {} has none; pass the node's --data-dir (or TROUPE_DATA_DIR) when \
                     it runs with one, or a token with --token / TROUPE_TOKEN",
                    data_dir.join(crate::auth::ADMIN_TOKEN_FILE).display()
                )
            })?,
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
        })
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

    /// Sends a request and turns transport failures into a message that says what to check.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        request.send().await.map_err(|error| {
            if error.is_connect() {
                anyhow::anyhow!(
                    "cannot reach a node at {}: is it running? (start one with `troupe node`, or \
                     point --node / TROUPE_URL at it)",
                    self.base
                )
            } else {
                anyhow::anyhow!("request to {} failed: {error}", self.base)
            }
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
