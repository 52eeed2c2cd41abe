//! Whether a file or directory is this user's alone: the one rule behind the data directory, its
//! admin token and the discovery directory, whose contents decide who gets the admin role and
//! where the admin token is sent.
//!
//! Only inspects metadata; it never creates, changes or removes anything. Callers refuse what it
//! reports, saying what to do in their own terms.

use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// Mode bits a private file or directory must not have: any access by group or others.
pub const NO_GROUP_OR_OTHER_ACCESS: u32 = 0o077;

/// Mode bits a directory others may read but not change must not have: write by group or others.
pub const NO_GROUP_OR_OTHER_WRITE: u32 = 0o022;

/// The effective user id of this process: the user whose files this process may trust.
pub fn current_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why a path is not this user's alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// It belongs to another user, who may change it (or have planted it).
    Owner {
        /// The path's owner.
        owner: u32,
        /// This process's effective uid.
        uid: u32,
    },
    /// Its mode gives group or others access it must not give.
    Mode {
        /// The permission bits (`mode & 0o777`).
        mode: u32,
        /// The bits it must not have.
        forbidden: u32,
    },
}

impl fmt::Display for Exposure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Owner { owner, uid } => {
                write!(f, "is owned by uid {owner}, not by you (uid {uid})")
            }
            Self::Mode { mode, forbidden } if mode & forbidden & 0o022 != 0 => {
                write!(f, "is mode {mode:04o}, writable by group or others")
            }
            Self::Mode { mode, .. } => write!(f, "is mode {mode:04o}, open to group or others"),
        }
    }
}

/// What, if anything, exposes a path with `metadata` to users other than `uid`: another owner,
/// or any of the `forbidden` mode bits.
pub fn exposure(metadata: &Metadata, uid: u32, forbidden: u32) -> Option<Exposure> {
    if metadata.uid() != uid {
        return Some(Exposure::Owner {
            owner: metadata.uid(),
            uid,
        });
    }
    let mode = metadata.permissions().mode() & 0o777;
    (mode & forbidden != 0).then_some(Exposure::Mode { mode, forbidden })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_uid_owns_what_this_process_creates() {
        let file = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(current_uid(), file.as_file().metadata().unwrap().uid());
    }

    #[test]
    fn another_owner_or_a_forbidden_bit_is_an_exposure() {
        let dir = tempfile::tempdir().unwrap();
        let me = current_uid();
        let mode = |mode: u32| {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(dir.path()).unwrap()
        };
        assert_eq!(exposure(&mode(0o700), me, NO_GROUP_OR_OTHER_ACCESS), None);
        assert_eq!(exposure(&mode(0o755), me, NO_GROUP_OR_OTHER_WRITE), None);
        let open = exposure(&mode(0o750), me, NO_GROUP_OR_OTHER_ACCESS).unwrap();
        assert_eq!(open.to_string(), "is mode 0750, open to group or others");
        let writable = exposure(&mode(0o1777), me, NO_GROUP_OR_OTHER_WRITE).unwrap();
        assert_eq!(
            writable.to_string(),
            "is mode 0777, writable by group or others"
        );
        let theirs = exposure(&mode(0o700), me + 1, NO_GROUP_OR_OTHER_ACCESS).unwrap();
        assert_eq!(
            theirs.to_string(),
            format!("is owned by uid {me}, not by you (uid {})", me + 1)
        );
    }
}
