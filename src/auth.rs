//! Who may do what: bearer tokens, roles, the admin token a node writes on first start, and the
//! per-token request rate limit.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time, against every known
//! token, so neither a token's value nor which entry matched leaks through timing. Token values
//! are never logged; a token's configured name is.

use std::fs;
use std::io::Write;
use std::num::NonZeroU32;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use crate::ownership::{
    Exposure, NO_GROUP_OR_OTHER_ACCESS, NO_GROUP_OR_OTHER_WRITE, current_uid, exposure,
};

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

/// The principal name of the node's admin token (the data directory's `admin.token`).
pub const ADMIN_PRINCIPAL: &str = "admin";

/// The principal name of the stdio MCP client of a node embedded in `troupe mcp`.
pub const STDIO_PRINCIPAL: &str = "stdio";

/// Names `auth.tokens` may not take (in any case): the node's own principals. A principal's name
/// keys its rate limit and its link quota, so a configured token must not share one.
pub const RESERVED_TOKEN_NAMES: [&str; 2] = [ADMIN_PRINCIPAL, STDIO_PRINCIPAL];

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
                    name: ADMIN_PRINCIPAL.into(),
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
pub enum TokenFileError {
    /// Creating, reading or writing failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The data directory is another user's or writable by others, who could put an admin token
    /// of their own there and take the admin role.
    #[error(
        "the data directory {} {exposure}: another user could put an admin token of their own \
         there and take the admin role; {}",
        dir.display(),
        data_dir_fix(dir, exposure)
    )]
    DataDirNotPrivate {
        /// The data directory.
        dir: PathBuf,
        /// What exposes it.
        exposure: Exposure,
    },
    /// The admin token file is another user's, or open to group or others.
    #[error(
        "the admin token {} {exposure}: {}",
        path.display(),
        token_fix(path, exposure)
    )]
    TokenNotPrivate {
        /// The token file.
        path: PathBuf,
        /// What exposes it.
        exposure: Exposure,
    },
}

/// Where to choose another data directory, as the error messages say it.
const ANOTHER_DATA_DIR: &str =
    "use a data directory of your own (--data-dir, TROUPE_DATA_DIR or data_dir in the config file)";

fn data_dir_fix(dir: &Path, exposure: &Exposure) -> String {
    match exposure {
        Exposure::Owner { .. } => format!(
            "{ANOTHER_DATA_DIR}, or, if the directory is yours to remove, remove it (the node \
             makes it again, private)"
        ),
        Exposure::Mode { .. } => {
            format!("run `chmod go-w {}`, or {ANOTHER_DATA_DIR}", dir.display())
        }
    }
}

fn token_fix(path: &Path, exposure: &Exposure) -> String {
    match exposure {
        Exposure::Owner { .. } => format!(
            "another user could have put it there to take the admin role; if it is yours to \
             remove, remove it (the node writes a new one), or {ANOTHER_DATA_DIR}"
        ),
        Exposure::Mode { .. } => format!(
            "others may have read it; remove it (the node writes a new one, which clients then \
             read) or run `chmod 600 {}`",
            path.display()
        ),
    }
}

/// Creates the data directory (mode 0700) if needed, and refuses one that is not this user's:
/// owned by another user, or writable by group or others.
pub fn ensure_data_dir(dir: &Path) -> Result<(), TokenFileError> {
    ensure_data_dir_as(dir, current_uid())
}

fn ensure_data_dir_as(dir: &Path, uid: u32) -> Result<(), TokenFileError> {
    let io = |what| {
        move |source| TokenFileError::Io {
            what,
            path: dir.to_owned(),
            source,
        }
    };
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("cannot create the data directory"))?;
    }
    let metadata = fs::metadata(dir).map_err(io("cannot inspect the data directory"))?;
    match exposure(&metadata, uid, NO_GROUP_OR_OTHER_WRITE) {
        None => Ok(()),
        Some(exposure) => Err(TokenFileError::DataDirNotPrivate {
            dir: dir.to_owned(),
            exposure,
        }),
    }
}

/// Reads the admin token from the data directory, writing a new random one (mode 0600) on
/// first start. Returns the token, its path, and whether it was just created. A token file of
/// another user, or open to group or others, is refused.
pub fn ensure_admin_token(data_dir: &Path) -> Result<(String, PathBuf, bool), TokenFileError> {
    ensure_admin_token_as(data_dir, current_uid())
}

fn ensure_admin_token_as(
    data_dir: &Path,
    uid: u32,
) -> Result<(String, PathBuf, bool), TokenFileError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    // Another process starting on the same fresh directory may put its token in place between
    // our read and our write: then ours is not written and theirs is read. Twice is enough for
    // that; the third round is for a file removed again in between.
    for _ in 0..3 {
        match read_own_token(&path, uid)? {
            OwnToken::Found(token) => return Ok((token, path, false)),
            OwnToken::Missing => {}
            OwnToken::Empty => match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(TokenFileError::Io {
                        what: "cannot replace the empty admin token",
                        path,
                        source,
                    });
                }
            },
        }
        match write_new_token(data_dir, &path) {
            Ok(token) => return Ok((token, path, true)),
            Err(NewTokenError::Exists) => continue,
            Err(NewTokenError::Io(what, source)) => {
                return Err(TokenFileError::Io { what, path, source });
            }
        }
    }
    Err(TokenFileError::Io {
        what: "cannot write the admin token",
        path,
        source: std::io::Error::other(
            "another process keeps replacing it; is a second node starting on this data directory?",
        ),
    })
}

/// What the data directory holds as the admin token.
enum OwnToken {
    /// A token.
    Found(String),
    /// No file.
    Missing,
    /// An empty file (of this user; no token in it to expose).
    Empty,
}

/// Reads the admin token file at `path` if there is one, refusing a file of another user and a
/// token open to group or others. The checks are made on the opened file, not on the path.
fn read_own_token(path: &Path, uid: u32) -> Result<OwnToken, TokenFileError> {
    use std::io::Read;
    let io = |source| TokenFileError::Io {
        what: "cannot read the admin token",
        path: path.to_owned(),
        source,
    };
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(OwnToken::Missing);
        }
        Err(source) => return Err(io(source)),
    };
    let metadata = file.metadata().map_err(io)?;
    let mut token = String::new();
    file.read_to_string(&mut token).map_err(io)?;
    let token = token.trim();
    match exposure(&metadata, uid, NO_GROUP_OR_OTHER_ACCESS) {
        // An empty file of this user, however open, exposes nothing: it is replaced.
        Some(Exposure::Mode { .. }) | None if token.is_empty() => Ok(OwnToken::Empty),
        None => Ok(OwnToken::Found(token.to_owned())),
        Some(exposure) => Err(TokenFileError::TokenNotPrivate {
            path: path.to_owned(),
            exposure,
        }),
    }
}

enum NewTokenError {
    /// A token file appeared at the path meanwhile.
    Exists,
    /// What failed, and why.
    Io(&'static str, std::io::Error),
}

/// Writes a new random token to `path`, which must not exist. The token is written and synced
/// in a temporary file (0600) that is then linked to `path` without replacing anything, so a
/// concurrent reader never sees a half-written token and a concurrent writer's token is never
/// overwritten (`create_new` on `path` itself would let the loser read an empty file).
fn write_new_token(data_dir: &Path, path: &Path) -> Result<String, NewTokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| {
        NewTokenError::Io(
            "cannot generate the admin token for",
            std::io::Error::other(error.to_string()),
        )
    })?;
    let token = format!("trp_{}", hex::encode(bytes));
    let write = "cannot write the admin token";
    let mut file = tempfile::Builder::new()
        .prefix(".admin.token.")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(data_dir)
        .map_err(|source| NewTokenError::Io(write, source))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.as_file().sync_all())
        .map_err(|source| NewTokenError::Io(write, source))?;
    match file.persist_noclobber(path) {
        Ok(_) => Ok(token),
        Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(NewTokenError::Exists)
        }
        Err(error) => Err(NewTokenError::Io(write, error.error)),
    }
}

/// Reads an existing admin token (for the CLI): `None` when the data directory has none (no
/// file, or an empty one); an error when the file is there but cannot be read (another user's,
/// a directory…), which is not the same thing to the user.
pub fn read_admin_token(data_dir: &Path) -> Result<Option<String>, TokenFileError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let token = match fs::read_to_string(&path) {
        Ok(token) => token,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenFileError::Io {
                what: "cannot read the admin token",
                path,
                source,
            });
        }
    };
    let token = token.trim();
    Ok((!token.is_empty()).then(|| token.to_owned()))
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
        assert_eq!(read_admin_token(&data).unwrap(), Some(token));

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

    /// Regression: a data directory another user made (`/tmp/troupe-a`), or one others may
    /// write, was used as it was, with the admin token found there.
    #[test]
    fn a_data_dir_of_another_user_or_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let me = current_uid();
        ensure_data_dir_as(&data, me).unwrap();
        let error = ensure_data_dir_as(&data, me + 1).unwrap_err().to_string();
        assert!(
            error.contains(&format!(
                "is owned by uid {me}, not by you (uid {})",
                me + 1
            )) && error.contains("--data-dir"),
            "{error}"
        );
        for mode in [0o777, 0o770, 0o702] {
            fs::set_permissions(&data, fs::Permissions::from_mode(mode)).unwrap();
            let error = ensure_data_dir(&data).unwrap_err().to_string();
            assert!(
                error.contains(&format!("mode {mode:04o}, writable by group or others"))
                    && error.contains(&format!("chmod go-w {}", data.display())),
                "{error}"
            );
        }
        // Readable by others is not a way in: the token file itself is 0600.
        fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_data_dir(&data).unwrap();
    }

    /// Regression: an admin token of another user, or one readable by others, was accepted
    /// (the latter with a warning only).
    #[test]
    fn an_admin_token_of_another_user_or_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let me = current_uid();
        let (token, path, _) = ensure_admin_token(dir.path()).unwrap();
        let error = ensure_admin_token_as(dir.path(), me + 1)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is owned by uid") && error.contains("remove it"),
            "{error}"
        );
        for mode in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let error = ensure_admin_token(dir.path()).unwrap_err().to_string();
            assert!(
                error.contains(&format!("mode {mode:04o}"))
                    && error.contains("remove it (the node writes a new one")
                    && error.contains(&format!("chmod 600 {}", path.display())),
                "{error}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(ensure_admin_token(dir.path()).unwrap().0, token);
    }

    /// Regression: the token was written with create + truncate, so of two nodes starting on a
    /// fresh directory one could overwrite the token the other had read.
    #[test]
    fn a_new_token_never_replaces_one_already_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let (token, _, _) = ensure_admin_token(dir.path()).unwrap();
        assert!(matches!(
            write_new_token(dir.path(), &path),
            Err(NewTokenError::Exists)
        ));
        assert_eq!(fs::read_to_string(&path).unwrap().trim(), token);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [ADMIN_TOKEN_FILE], "no temporary file is left");

        // Starters racing on a fresh directory all end up with one token, written once.
        let fresh = tempfile::tempdir().unwrap();
        let barrier = std::sync::Barrier::new(8);
        let results: Vec<_> = std::thread::scope(|scope| {
            let starters: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        ensure_admin_token(fresh.path()).unwrap()
                    })
                })
                .collect();
            starters.into_iter().map(|s| s.join().unwrap()).collect()
        });
        let on_disk = read_admin_token(fresh.path()).unwrap().unwrap();
        assert!(results.iter().all(|(token, _, _)| *token == on_disk));
        assert_eq!(results.iter().filter(|(_, _, created)| *created).count(), 1);
    }

    /// Regression: a token file that could not be read was reported as missing, so the CLI told
    /// the user to pass the --data-dir they had passed.
    #[test]
    fn an_unreadable_token_file_is_an_error_not_a_missing_token() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_admin_token(dir.path()).unwrap(), None);
        fs::write(dir.path().join(ADMIN_TOKEN_FILE), "\n").unwrap();
        assert_eq!(read_admin_token(dir.path()).unwrap(), None, "empty");
        fs::remove_file(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        // A path that cannot be read as a file, whoever runs the test (root reads mode 000).
        fs::create_dir(dir.path().join(ADMIN_TOKEN_FILE)).unwrap();
        let error = read_admin_token(dir.path()).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!(
                "cannot read the admin token {}: ",
                dir.path().join(ADMIN_TOKEN_FILE).display()
            )),
            "{error}"
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
