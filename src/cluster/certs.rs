//! The cluster's certificates: a CA made by `troupe cluster init`, node certificates issued from
//! it by `troupe cluster issue NAME`, and loading them back for the QUIC endpoint.
//!
//! A node certificate carries the node id as its common name and the fixed DNS name
//! [`SERVER_NAME`] (what a dialing node asks for, so node ids need not be DNS names). The node id
//! is read back from the certificate after every handshake and compared with the one expected.
//!
//! A node checks its own certificate when it loads it, as its peers will: a certificate outside
//! its validity period or not issued by the configured CA is refused at start, naming the file,
//! the dates and what to do, rather than failing every handshake later with logs that blame the
//! peers. A node certificate is issued for [`NODE_VALIDITY`]; fewer than [`EXPIRY_WARNING`] left
//! is said at start ([`expiry_warning`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use time::OffsetDateTime;
use troupe_actors::ids::NodeId;

/// The DNS name in every node certificate, used as the TLS server name when dialing.
pub const SERVER_NAME: &str = "troupe-node";
/// File names under `<data_dir>/cluster/` (the config defaults point at them).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (only on nodes that issue certificates).
pub const CA_KEY_FILE: &str = "ca.key";
/// This node's certificate.
pub const NODE_CERT_FILE: &str = "node.pem";
/// This node's private key.
pub const NODE_KEY_FILE: &str = "node.key";

/// How long a CA made by `troupe cluster init` is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long an issued node certificate is valid.
pub const NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A node says at start that its certificate expires soon when fewer than this is left.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// Largest certificate or key file read.
const MAX_PEM_BYTES: u64 = 64 * 1024;

/// Why certificates could not be made, written or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file that must not be overwritten exists.
    #[error("{} already exists; remove it first (or choose another directory)", .0.display())]
    Exists(PathBuf),
    /// A file does not hold what it should.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// This node's certificate cannot be used now: expired, not valid yet, or not issued by
    /// the CA it is configured with. The message says which, with the dates, and what to do.
    #[error("{}: {message}", path.display())]
    Unusable {
        /// The node certificate.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files of one node: the CA certificate, its certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The node certificate.
    pub cert: PathBuf,
    /// The node key.
    pub key: PathBuf,
}

impl NodeFiles {
    /// The default names in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(NODE_CERT_FILE),
            key: dir.join(NODE_KEY_FILE),
        }
    }
}

/// A node certificate and key, loaded.
#[derive(Debug)]
pub struct NodeCredentials {
    /// The CA certificate.
    pub ca: CertificateDer<'static>,
    /// The node certificate (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
    /// The node id in the certificate.
    pub node: NodeId,
    /// When the certificate stops being valid.
    pub not_after: SystemTime,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CertError {
    let path = path.to_owned();
    move |source| CertError::Io { what, path, source }
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("cannot create the directory", dir))
}

/// Writes a new file (never replaces one), with `mode`.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists(path.to_owned())
            } else {
                io("cannot create", path)(source)
            }
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("cannot write", path))
}

fn read_pem(path: &Path) -> Result<String, CertError> {
    let size = fs::metadata(path).map_err(io("cannot read", path))?.len();
    if size > MAX_PEM_BYTES {
        return Err(CertError::Invalid {
            path: path.to_owned(),
            message: format!("{size} bytes; a PEM file of at most {MAX_PEM_BYTES} is expected"),
        });
    }
    fs::read_to_string(path).map_err(io("cannot read", path))
}

fn validity(params: &mut CertificateParams, now: OffsetDateTime, valid_for: Duration) {
    // An hour of slack for clocks that disagree a little.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + valid_for;
}

fn ca_params(now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "troupe cluster CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, now, CA_VALIDITY);
    params
}

/// A new CA: its certificate and key, PEM.
pub fn new_ca(now: OffsetDateTime) -> Result<(String, String), CertError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(now).self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A node certificate for `node` signed by the CA, valid from `not_before` to `not_after`:
/// certificate and key, PEM.
pub fn issue_node(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    node: &NodeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(String, String), CertError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, node.as_str());
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `troupe cluster init`: writes a new CA (`ca.pem`, `ca.key`) and a certificate for `node`
/// (`node.pem`, `node.key`) into `dir`. Refuses to replace any of them.
pub fn init(dir: &Path, node: &NodeId, now: OffsetDateTime) -> Result<NodeFiles, CertError> {
    create_dir(dir)?;
    let files = NodeFiles::in_dir(dir);
    let ca_key_path = dir.join(CA_KEY_FILE);
    for path in [&files.ca, &ca_key_path, &files.cert, &files.key] {
        if path.exists() {
            return Err(CertError::Exists(path.clone()));
        }
    }
    let (ca_pem, ca_key) = new_ca(now)?;
    let (node_pem, node_key) = issue_node(
        &ca_pem,
        &ca_key,
        node,
        now - time::Duration::hours(1),
        now + NODE_VALIDITY,
    )?;
    write_new(&ca_key_path, &ca_key, 0o600)?;
    write_new(&files.ca, &ca_pem, 0o644)?;
    write_new(&files.key, &node_key, 0o600)?;
    write_new(&files.cert, &node_pem, 0o644)?;
    Ok(files)
}

/// `troupe cluster issue NAME --out DIR`: a certificate for `node` from the CA in `ca_dir`,
/// written with the CA certificate (not its key) into `out`.
pub fn issue(
    ca_dir: &Path,
    node: &NodeId,
    out: &Path,
    now: OffsetDateTime,
) -> Result<NodeFiles, CertError> {
    // A missing CA file is a node without a CA: say how to get one.
    let no_ca = |path: PathBuf| {
        move |error| match error {
            CertError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                CertError::Invalid {
                    path,
                    message: "no CA here; run `troupe cluster init` on this node first, or issue \
                              from the node that holds the CA (with its --data-dir)"
                        .into(),
                }
            }
            other => other,
        }
    };
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_pem = read_pem(&ca_cert_path).map_err(no_ca(ca_cert_path.clone()))?;
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_key = read_pem(&ca_key_path).map_err(no_ca(ca_key_path.clone()))?;
    create_dir(out)?;
    let files = NodeFiles::in_dir(out);
    for path in [&files.ca, &files.cert, &files.key] {
        if path.exists() {
            return Err(CertError::Exists(path.clone()));
        }
    }
    let (node_pem, node_key) = issue_node(
        &ca_pem,
        &ca_key,
        node,
        now - time::Duration::hours(1),
        now + NODE_VALIDITY,
    )?;
    write_new(&files.ca, &ca_pem, 0o644)?;
    write_new(&files.key, &node_key, 0o600)?;
    write_new(&files.cert, &node_pem, 0o644)?;
    Ok(files)
}

/// Loads a node's files, reads its node id from its certificate and checks that the
/// certificate can be used now: within its validity period and issued by the CA in `files.ca`
/// (as the peers check it).
pub fn load(files: &NodeFiles) -> Result<NodeCredentials, CertError> {
    let credentials = load_unchecked(files)?;
    check(files, &credentials, SystemTime::now())?;
    Ok(credentials)
}

/// [`load`] without the check: for tests of how peers refuse a certificate a node could not use
/// itself.
pub(crate) fn load_unchecked(files: &NodeFiles) -> Result<NodeCredentials, CertError> {
    let invalid = |path: &Path, message: String| CertError::Invalid {
        path: path.to_owned(),
        message,
    };
    let ca_pem = read_pem(&files.ca)?;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|error| invalid(&files.ca, format!("no PEM certificate ({error})")))?;
    let cert_pem = read_pem(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(&files.cert, format!("bad PEM ({error})")))?;
    let Some(leaf) = chain.first() else {
        return Err(invalid(&files.cert, "no PEM certificate".into()));
    };
    let node = node_id_of(leaf).map_err(|message| invalid(&files.cert, message))?;
    let (_, not_after) = validity_of(leaf).map_err(|message| invalid(&files.cert, message))?;
    let key_pem = read_pem(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|error| invalid(&files.key, format!("no PEM private key ({error})")))?;
    Ok(NodeCredentials {
        ca,
        chain,
        key,
        node,
        not_after,
    })
}

/// A certificate's validity period.
fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|error| format!("not an X.509 certificate ({error})"))?;
    let at =
        |timestamp: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(timestamp).unwrap_or(0));
    let validity = parsed.validity();
    Ok((
        at(validity.not_before.timestamp()),
        at(validity.not_after.timestamp()),
    ))
}

fn date(time: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(time)
}

/// What to do about an unusable node certificate.
fn reissue(credentials: &NodeCredentials) -> String {
    format!(
        "issue a new one with `troupe cluster issue {} --out DIR` on the node that holds the \
         CA (its --data-dir) and put DIR's files in place of this node's",
        credentials.node
    )
}

/// Checks this node's own certificate as of `now`, as its peers will: its validity period, then
/// that the CA in `files.ca` issued it for a client (and so a server: both uses are in every
/// node certificate).
fn check(
    files: &NodeFiles,
    credentials: &NodeCredentials,
    now: SystemTime,
) -> Result<(), CertError> {
    let unusable = |message: String| CertError::Unusable {
        path: files.cert.clone(),
        message,
    };
    let leaf = &credentials.chain[0];
    let (not_before, not_after) = validity_of(leaf).map_err(&unusable)?;
    if now > not_after {
        return Err(unusable(format!(
            "this node's certificate expired on {} (it was valid from {}); peers refuse it. \
             {}",
            date(not_after),
            date(not_before),
            reissue(credentials)
        )));
    }
    if now < not_before {
        return Err(unusable(format!(
            "this node's certificate is not valid yet: from {} to {}, and this node's clock \
             says {}; peers refuse it until then. Set this node's clock right, or {}",
            date(not_before),
            date(not_after),
            date(now),
            reissue(credentials)
        )));
    }
    let mut roots = RootCertStore::empty();
    roots
        .add(credentials.ca.clone())
        .map_err(|error| CertError::Invalid {
            path: files.ca.clone(),
            message: format!("not a usable CA certificate ({error})"),
        })?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
            .map_err(|error| CertError::Invalid {
                path: files.ca.clone(),
                message: format!("not a usable CA certificate ({error})"),
            })?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    verifier
        .verify_client_cert(
            leaf,
            &credentials.chain[1..],
            UnixTime::since_unix_epoch(since_epoch),
        )
        .map_err(|error| {
            unusable(format!(
                "this node's certificate was not issued by the CA in {} ({error}), so peers of \
                 that CA refuse it; {}, or set cluster.ca to the CA that issued it",
                files.ca.display(),
                reissue(credentials)
            ))
        })?;
    Ok(())
}

/// What to say at start when this node's certificate has fewer than [`EXPIRY_WARNING`] left as
/// of `now`; `None` otherwise.
pub fn expiry_warning(
    files: &NodeFiles,
    credentials: &NodeCredentials,
    now: SystemTime,
) -> Option<String> {
    let left = credentials
        .not_after
        .duration_since(now)
        .unwrap_or_default();
    if left >= EXPIRY_WARNING {
        return None;
    }
    Some(format!(
        "{}: this node's certificate expires on {} (in {} days); peers refuse it from then on: \
         {}, and restart the node with it",
        files.cert.display(),
        date(credentials.not_after),
        left.as_secs() / (24 * 3600),
        reissue(credentials)
    ))
}

/// The node id a certificate was issued to (its common name).
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|error| format!("not an X.509 certificate ({error})"))?;
    let common_name = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|name| name.as_str().ok())
        .ok_or_else(|| "the certificate has no common name (the node id)".to_owned())?;
    NodeId::new(common_name)
        .map_err(|error| format!("the certificate's common name is not a node id: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_writes_files_that_load_with_their_node_ids() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("a/cluster");
        let now = OffsetDateTime::now_utc();
        let files = init(&ca_dir, &NodeId::new("a").unwrap(), now).unwrap();
        assert_eq!(load(&files).unwrap().node.as_str(), "a");
        let key_mode = |path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(path).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(key_mode(&files.key), 0o600);
        assert_eq!(key_mode(&ca_dir.join(CA_KEY_FILE)), 0o600);

        let out = dir.path().join("b");
        let issued = issue(&ca_dir, &NodeId::new("b").unwrap(), &out, now).unwrap();
        let loaded = load(&issued).unwrap();
        assert_eq!(loaded.node.as_str(), "b");
        assert_eq!(loaded.ca, load(&files).unwrap().ca, "the same CA");
        assert!(!out.join(CA_KEY_FILE).exists(), "the CA key stays home");

        let again = init(&ca_dir, &NodeId::new("a").unwrap(), now).unwrap_err();
        assert!(matches!(again, CertError::Exists(_)), "{again}");
        let again = issue(&ca_dir, &NodeId::new("b").unwrap(), &out, now).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
    }

    #[test]
    fn issuing_without_a_ca_key_says_where_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let home = init(&dir.path().join("a"), &NodeId::new("a").unwrap(), now).unwrap();
        let copy = dir.path().join("b");
        let issued = issue(
            home.ca.parent().unwrap(),
            &NodeId::new("b").unwrap(),
            &copy,
            now,
        )
        .unwrap();
        let error = issue(
            &copy,
            &NodeId::new("c").unwrap(),
            &dir.path().join("c"),
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("troupe cluster init"), "{error}");
        assert!(issued.ca.exists());

        // A directory with no CA at all (the default data dir of a node that never made one).
        let error = issue(
            &dir.path().join("nowhere"),
            &NodeId::new("d").unwrap(),
            &dir.path().join("d"),
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("troupe cluster init"), "{error}");
        assert!(error.contains("ca.pem"), "{error}");
    }

    /// A node directory holding `ca_dir`'s CA certificate and a certificate of `node` from
    /// `issuer_dir`'s CA valid from `not_before` to `not_after`.
    fn node_files(
        dir: &Path,
        ca_dir: &Path,
        issuer_dir: &Path,
        node: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> NodeFiles {
        let (cert, key) = issue_node(
            &fs::read_to_string(issuer_dir.join(CA_CERT_FILE)).unwrap(),
            &fs::read_to_string(issuer_dir.join(CA_KEY_FILE)).unwrap(),
            &NodeId::new(node).unwrap(),
            not_before,
            not_after,
        )
        .unwrap();
        let out = dir.join(node);
        fs::create_dir_all(&out).unwrap();
        let files = NodeFiles::in_dir(&out);
        fs::copy(ca_dir.join(CA_CERT_FILE), &files.ca).unwrap();
        fs::write(&files.cert, cert).unwrap();
        fs::write(&files.key, key).unwrap();
        files
    }

    /// A node started with an expired certificate used to start fine, then fail every handshake
    /// with log lines that blamed the peers. Now it is refused when loaded, naming the file,
    /// the dates and how to get a new one.
    #[test]
    fn an_expired_node_certificate_is_refused_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let ca = dir.path().join("ca");
        init(&ca, &NodeId::new("a").unwrap(), now).unwrap();
        let days = time::Duration::days;
        let files = node_files(dir.path(), &ca, &ca, "old", now - days(400), now - days(1));
        let error = load(&files).unwrap_err();
        assert!(matches!(error, CertError::Unusable { .. }), "{error}");
        let error = error.to_string();
        assert!(error.contains("expired on"), "{error}");
        assert!(error.contains("old/node.pem"), "{error}");
        assert!(error.contains("troupe cluster issue old"), "{error}");
        // Peers see it as such (the endpoint's tests bind with it).
        assert_eq!(load_unchecked(&files).unwrap().node.as_str(), "old");
    }

    #[test]
    fn a_node_certificate_not_valid_yet_is_refused_naming_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let ca = dir.path().join("ca");
        init(&ca, &NodeId::new("a").unwrap(), now).unwrap();
        let days = time::Duration::days;
        let files = node_files(dir.path(), &ca, &ca, "early", now + days(1), now + days(30));
        let error = load(&files).unwrap_err().to_string();
        assert!(error.contains("not valid yet"), "{error}");
        assert!(error.contains("clock"), "{error}");
    }

    /// A certificate of another CA than the configured ca.pem: every peer of that CA refuses
    /// it, so the node does not start with it.
    #[test]
    fn a_node_certificate_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let ours = dir.path().join("ours");
        let theirs = dir.path().join("theirs");
        init(&ours, &NodeId::new("a").unwrap(), now).unwrap();
        init(&theirs, &NodeId::new("x").unwrap(), now).unwrap();
        let days = time::Duration::days;
        let files = node_files(
            dir.path(),
            &ours,
            &theirs,
            "b",
            now - days(1),
            now + days(30),
        );
        let error = load(&files).unwrap_err().to_string();
        assert!(error.contains("not issued by the CA in"), "{error}");
        assert!(error.contains("b/ca.pem"), "{error}");
        assert!(error.contains("cluster.ca"), "{error}");
    }

    #[test]
    fn fewer_than_thirty_days_left_is_said_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let ca = dir.path().join("ca");
        init(&ca, &NodeId::new("a").unwrap(), now).unwrap();
        let days = time::Duration::days;
        let soon = node_files(dir.path(), &ca, &ca, "soon", now - days(1), now + days(10));
        let credentials = load(&soon).unwrap();
        let warning = expiry_warning(&soon, &credentials, SystemTime::now()).unwrap();
        assert!(warning.contains("expires on"), "{warning}");
        assert!(warning.contains("troupe cluster issue soon"), "{warning}");
        let fresh = load(&NodeFiles::in_dir(&ca)).unwrap();
        assert_eq!(
            expiry_warning(&NodeFiles::in_dir(&ca), &fresh, SystemTime::now()),
            None
        );
    }

    #[test]
    fn garbage_files_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let files = NodeFiles::in_dir(dir.path());
        fs::write(&files.ca, "not pem").unwrap();
        fs::write(&files.cert, "not pem").unwrap();
        fs::write(&files.key, "not pem").unwrap();
        let error = load(&files).unwrap_err().to_string();
        assert!(error.contains("ca.pem"), "{error}");
    }
}
