//! Who may do what: bearer tokens, roles, the admin token a node writes on first start, and the
//! per-token request rate limit.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time, against every known
//! token, so neither a token's value nor which entry matched leaks through timing. Token values
//! are never logged; a token's configured name is.

use std::fs;
use std::io::Write;
use std::num::NonZeroU32;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

/// What a token may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read state and follow events.
    Viewer,
    /// Also spawn and cancel sessions, and use the gateway.
    Operator,
    /// Everything, including fault injection.
    Admin,
}

impl Role {
    /// True when this role includes `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }

    /// The role's name as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's configured name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// File name of the generated admin token inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The known tokens.
#[derive(Clone)]
pub struct TokenBook {
    entries: Vec<([u8; 32], Principal)>,
}

impl std::fmt::Debug for TokenBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.entries.iter().map(|(_, p)| &p.name).collect();
        f.debug_struct("TokenBook").field("names", &names).finish()
    }
}

/// SHA-256 of a token, as stored in `auth.tokens[].sha256`.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenBook {
    /// Builds the book from the configured tokens and, when given, the node's admin token.
    /// Configured digests must already be validated (64 hex characters).
    pub fn new(config: &AuthConfig, admin_token: Option<&str>) -> Self {
        let mut entries: Vec<([u8; 32], Principal)> = config
            .tokens
            .iter()
            .filter_map(|token| {
                let bytes = hex::decode(&token.sha256).ok()?;
                let digest: [u8; 32] = bytes.try_into().ok()?;
                Some((
                    digest,
                    Principal {
                        name: token.name.clone(),
                        role: token.role,
                    },
                ))
            })
            .collect();
        if let Some(token) = admin_token {
            entries.push((
                digest(token),
                Principal {
                    name: "admin".into(),
                    role: Role::Admin,
                },
            ));
        }
        Self { entries }
    }

    /// The principal a bearer token belongs to. Compares against every entry in constant time.
    pub fn authenticate(&self, bearer: &str) -> Option<Principal> {
        let presented = digest(bearer);
        let mut found = None;
        for (known, principal) in &self.entries {
            if bool::from(known.ct_eq(&presented)) && found.is_none() {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// Requests per token, a leaky bucket per principal name.
pub struct RequestLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl RequestLimiter {
    /// A limiter allowing `per_second` sustained and `burst` at once, per token.
    pub fn new(config: &AuthConfig) -> Self {
        let per_second = NonZeroU32::new(config.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: governor::RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// `Err(wait)` when the token must slow down.
    pub fn check(&self, principal: &Principal) -> Result<(), Duration> {
        self.limiter
            .check_key(&principal.name)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// Why the data directory or the admin token could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct TokenFileError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

/// Creates the data directory (mode 0700) if needed.
pub fn ensure_data_dir(dir: &Path) -> Result<(), TokenFileError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TokenFileError {
            what: "cannot create the data directory",
            path: dir.to_owned(),
            source,
        })
}

/// Reads the admin token from the data directory, writing a new random one (mode 0600) on
/// first start. Returns the token, its path, and whether it was just created.
pub fn ensure_admin_token(data_dir: &Path) -> Result<(String, PathBuf, bool), TokenFileError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => {
            let mode = fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
            if let Ok(mode) = mode
                && mode & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "the admin token file is readable by others; chmod 600 it"
                );
            }
            return Ok((token.trim().to_owned(), path, false));
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TokenFileError {
                what: "cannot read the admin token",
                path,
                source,
            });
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| TokenFileError {
        what: "cannot generate the admin token for",
        path: path.clone(),
        source: std::io::Error::other(error.to_string()),
    })?;
    let token = format!("trp_{}", hex::encode(bytes));
    let write = |path: &Path| -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        // `mode` applies only to a file this call creates: an empty one left there (a `touch`
        // under umask 022) would keep its looser mode.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(token.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    write(&path).map_err(|source| TokenFileError {
        what: "cannot write the admin token",
        path: path.clone(),
        source,
    })?;
    Ok((token, path, true))
}

/// Reads an existing admin token (for the CLI).
pub fn read_admin_token(data_dir: &Path) -> Option<String> {
    let token = fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE)).ok()?;
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn book() -> TokenBook {
        let config = AuthConfig {
            tokens: vec![
                TokenConfig {
                    name: "ci".into(),
                    role: Role::Operator,
                    sha256: hex::encode(digest("ci-secret")),
                },
                TokenConfig {
                    name: "dash".into(),
                    role: Role::Viewer,
                    sha256: hex::encode(digest("dash-secret")),
                },
            ],
            ..AuthConfig::default()
        };
        TokenBook::new(&config, Some("root-secret"))
    }

    #[test]
    fn tokens_resolve_to_their_principals() {
        let book = book();
        assert_eq!(book.authenticate("ci-secret").unwrap().role, Role::Operator);
        assert_eq!(book.authenticate("dash-secret").unwrap().name, "dash");
        assert_eq!(book.authenticate("root-secret").unwrap().role, Role::Admin);
        assert_eq!(book.authenticate("nope"), None);
        assert_eq!(book.authenticate(""), None);
    }

    #[test]
    fn roles_include_the_ones_below() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
    }

    #[test]
    fn the_admin_token_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        ensure_data_dir(&data).unwrap();
        assert_eq!(
            fs::metadata(&data).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let (token, path, created) = ensure_admin_token(&data).unwrap();
        assert!(created);
        assert!(token.starts_with("trp_") && token.len() == 68);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (again, _, created) = ensure_admin_token(&data).unwrap();
        assert!(!created);
        assert_eq!(again, token);
        assert_eq!(read_admin_token(&data), Some(token));

        // An empty token file someone left readable is filled and closed to others.
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let (_, _, created) = ensure_admin_token(&data).unwrap();
        assert!(created);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn the_limiter_refuses_past_the_burst_and_says_how_long_to_wait() {
        let limiter = RequestLimiter::new(&AuthConfig {
            requests_per_second: 1,
            burst: 2,
            ..AuthConfig::default()
        });
        let who = Principal {
            name: "ci".into(),
            role: Role::Operator,
        };
        assert!(limiter.check(&who).is_ok());
        assert!(limiter.check(&who).is_ok());
        let wait = limiter.check(&who).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        let other = Principal {
            name: "other".into(),
            role: Role::Viewer,
        };
        assert!(limiter.check(&other).is_ok(), "limits are per token");
    }
}
