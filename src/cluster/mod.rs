//! The QUIC cluster: certificates ([`certs`]), the node's endpoint with mutual TLS
//! ([`endpoint`]). Only this module knows the wire codec's use on the network.

pub mod certs;
pub mod endpoint;
pub mod membership;
pub mod relay;
pub mod remote;

pub use endpoint::{ClusterEndpoint, ClusterStats, DialError, EndpointError, Refusal};

use std::io::Write;
use std::path::Path;

/// The file in `<data_dir>/cluster/` that keeps the highest membership generation this node has
/// used, so that a restart rejoins with a higher one even when the clock stepped back.
pub const GENERATION_FILE: &str = "generation";

/// The generation kept in `dir`; 0 when there is none (a first start). An unreadable file is
/// logged and taken as none: the clock then decides, as before the file existed.
pub fn read_generation(dir: &Path) -> u64 {
    let path = dir.join(GENERATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %path.display(), "the kept cluster generation is not a number; ignored");
            0
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the kept cluster generation");
            0
        }
    }
}

/// What keeps each membership generation this node takes in `dir` (see
/// [`troupe_actors::cluster::GenerationFloor`]): a write on tokio's blocking pool, never a
/// lower generation over a higher one, a failure logged.
pub fn generation_keeper(dir: std::path::PathBuf) -> std::sync::Arc<dyn Fn(u64) + Send + Sync> {
    let kept = std::sync::Arc::new(std::sync::Mutex::new(0u64));
    std::sync::Arc::new(move |generation| {
        let (dir, kept) = (dir.clone(), kept.clone());
        tokio::task::spawn_blocking(move || {
            let mut kept = kept.lock().unwrap_or_else(|poison| poison.into_inner());
            if generation <= *kept {
                return;
            }
            match write_generation(&dir, generation) {
                Ok(()) => *kept = generation,
                Err(error) => tracing::warn!(
                    %error,
                    dir = %dir.display(),
                    "cannot keep the cluster generation; after a clock step back, a restart could \
                     rejoin as an older incarnation"
                ),
            }
        });
    })
}

/// Keeps `generation` in `dir`, durably (a new file synced, then renamed over the old one).
pub fn write_generation(dir: &Path, generation: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(GENERATION_FILE);
    let next = dir.join(format!("{GENERATION_FILE}.new"));
    let mut file = std::fs::File::create(&next)?;
    writeln!(file, "{generation}")?;
    file.sync_all()?;
    std::fs::rename(&next, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod generation_tests {
    /// Generations taken one after the other may be written in any order (each on the blocking
    /// pool): the file ends with the highest.
    #[tokio::test]
    async fn the_keeper_keeps_the_highest_generation_whatever_the_order_of_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = dir.path().join("cluster");
        std::fs::create_dir_all(&cluster).unwrap();
        let keep = super::generation_keeper(cluster.clone());
        for generation in [5, 3, 7, 6] {
            keep(generation);
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while super::read_generation(&cluster) != 7 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the highest generation is kept");
        // The lower ones that were written late did not overwrite it.
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        assert_eq!(super::read_generation(&cluster), 7);
    }

    use super::*;

    #[test]
    fn the_generation_is_kept_across_reads_and_nonsense_counts_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = dir.path().join("cluster");
        assert_eq!(read_generation(&cluster), 0, "a first start");
        write_generation(&cluster, 1_800_000_000_000_000).unwrap();
        assert_eq!(read_generation(&cluster), 1_800_000_000_000_000);
        write_generation(&cluster, 1_800_000_000_000_001).unwrap();
        assert_eq!(read_generation(&cluster), 1_800_000_000_000_001);
        std::fs::write(cluster.join(GENERATION_FILE), "soon").unwrap();
        assert_eq!(read_generation(&cluster), 0);
    }
}
