//! Whether a file or directory is this user's alone: owned by the effective
//! uid and writable by nobody else. The state directory (whose run records
//! decide what a later instance signals) and the output files (which others
//! read as the daemon's word) must not be open to another user's changes.

use std::{fs::Metadata, os::unix::fs::MetadataExt};

/// The rule a file or directory breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// It is owned by uid `owner`, not by `user`, the effective uid, which
    /// `chown` knows as `user_name` (`root`, or the number).
    NotOwned {
        owner: u32,
        user: u32,
        user_name: String,
    },
    /// Group or others can write to it; `mode` is its permission bits.
    Writable { mode: u32 },
}

/// Checks that `meta` is owned by this process's effective uid and that
/// neither group nor others can write to it; the owner is checked first.
pub fn check(meta: &Metadata) -> Result<(), Exposure> {
    // SAFETY: geteuid cannot fail.
    let user = unsafe { libc::geteuid() };
    if meta.uid() != user {
        return Err(Exposure::NotOwned {
            owner: meta.uid(),
            user,
            user_name: if user == 0 {
                "root".into()
            } else {
                user.to_string()
            },
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Exposure::Writable {
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}
