//! Platform layer: every system call the queue makes goes through here.
//!
//! The protocol needs calls that `std::fs` does not offer: operations relative to
//! directory handles (`openat`, `renameat2`, `unlinkat`, `fstatat`), `O_NOFOLLOW` and
//! `O_NONBLOCK` opens, allocation-free directory reads, extended attributes and
//! `statfs`. On Unix they come from `rustix`; elsewhere every call returns
//! [`std::io::ErrorKind::Unsupported`] at run time, so the crate still builds.

pub(crate) mod lock;
pub(crate) mod random;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub(crate) use unix::*;

#[cfg(not(unix))]
mod other;
#[cfg(not(unix))]
pub(crate) use other::*;

use std::time::SystemTime;

/// What kind of directory entry a name refers to, without following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    /// The directory read did not say (`DT_UNKNOWN`); a `stat` will.
    Unknown,
}

impl EntryKind {
    /// Lower-case name used in reasons and listings.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "regular file",
            EntryKind::Dir => "directory",
            EntryKind::Symlink => "symbolic link",
            EntryKind::Fifo => "FIFO",
            EntryKind::Socket => "socket",
            EntryKind::CharDevice => "character device",
            EntryKind::BlockDevice => "block device",
            EntryKind::Unknown => "unknown file type",
        }
    }
}

/// The parts of `struct stat` the queue looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileStat {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) kind: EntryKind,
    pub(crate) nlink: u64,
    pub(crate) size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub(crate) mode: u32,
    pub(crate) mtime: SystemTime,
    pub(crate) ctime: SystemTime,
}

impl FileStat {
    /// Whether both stats describe the same inode.
    pub(crate) fn same_file(&self, other: &FileStat) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

/// One entry of a directory read, borrowed from the read buffer.
#[derive(Debug)]
pub(crate) struct RawEntry<'a> {
    pub(crate) name: &'a std::ffi::OsStr,
    pub(crate) kind: EntryKind,
}

/// Filesystem facts that change how the queue syncs and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FsFamily {
    /// ext3/ext4 with a jbd2 journal, or xfs: one fsync commits every earlier metadata change.
    Journaled,
    /// tmpfs and ramfs: nothing survives a reboot and fsync costs nothing.
    Memory,
    /// NFS: no `RENAME_NOREPLACE`, no inotify, attribute caching.
    Network,
    /// FUSE: behaviour depends on the daemon; no trust in events.
    Fuse,
    /// Anything else (btrfs, ext4 without a journal, ...): sync every directory that changed.
    Other,
}

impl FsFamily {
    /// Whether inotify events and directory timestamps can be trusted.
    pub(crate) fn is_local(self) -> bool {
        !matches!(self, FsFamily::Network | FsFamily::Fuse)
    }
}

/// A process signal a Piper reacts to (see [`watch_signals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcessSignal {
    /// SIGTERM: systemd's way to stop a service.
    Terminate,
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGUSR1: log statistics.
    Statistics,
    /// SIGHUP.
    Hangup,
}

/// A signal for a whole process group (see `signal_group`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupSignal {
    /// SIGTERM: ask to stop.
    Terminate,
    /// SIGKILL: stop now.
    Kill,
}
