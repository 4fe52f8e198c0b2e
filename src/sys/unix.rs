//! Unix implementation of the platform layer, on top of `rustix`.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, RenameFlags};

use super::{EntryKind, FileStat, FsFamily, ProcessSignal, RawEntry};

/// Size of the buffer handed to `getdents64`; one call returns about 1,500 entries.
pub(crate) const SCAN_BUFFER_BYTES: usize = 64 * 1024;

/// An open directory; every name-based operation is relative to it, so a path swapped
/// for a symlink after the queue was opened cannot redirect the queue.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens `path` as a directory, following symlinks in it (used for the queue root).
    pub(crate) fn open(path: &Path) -> io::Result<Dir> {
        let fd = rfs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir { fd })
    }

    /// Opens the child directory `name`, refusing to follow a symlink.
    pub(crate) fn open_child(&self, name: &OsStr) -> io::Result<Dir> {
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir { fd })
    }

    /// Creates the child directory `name` with exactly `mode` (the umask is undone by a
    /// `chmod`, as Mentat does, so that group-shared queues stay group-writable).
    pub(crate) fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        rfs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode))?;
        rfs::chmodat(&self.fd, name, Mode::from_raw_mode(mode), AtFlags::empty())?;
        Ok(())
    }

    /// `fstat` of the directory itself.
    pub(crate) fn stat(&self) -> io::Result<FileStat> {
        Ok(convert_stat(&rfs::fstat(&self.fd)?))
    }

    /// `fstatat(name, AT_SYMLINK_NOFOLLOW)`.
    pub(crate) fn stat_at(&self, name: &OsStr) -> io::Result<FileStat> {
        Ok(convert_stat(&rfs::statat(
            &self.fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?))
    }

    /// Opens the file `name` for reading without following a symlink, without blocking on
    /// a FIFO or device, and without acquiring a controlling terminal.
    pub(crate) fn open_read(&self, name: &OsStr) -> io::Result<File> {
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// Opens the existing file `name` for writing, as [`open_read`](Dir::open_read) does
    /// for reading.
    pub(crate) fn open_write(&self, name: &OsStr) -> io::Result<File> {
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// Opens `name` for appending, creating it with `mode` if missing (`O_APPEND`:
    /// every `write` goes to the end, atomically with respect to other appenders), not
    /// following a symlink.
    pub(crate) fn open_append(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::WRONLY
                | OFlags::APPEND
                | OFlags::CREATE
                | OFlags::NOFOLLOW
                | OFlags::NONBLOCK
                | OFlags::NOCTTY
                | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Creates `name`, failing if it exists (`O_CREAT|O_EXCL`, which never follows a symlink).
    pub(crate) fn create_new(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Renames `from` in this directory to `to` in `to_dir`, failing with `AlreadyExists`
    /// if `to` exists.
    ///
    /// Uses `renameat2(RENAME_NOREPLACE)`. Filesystems without it (NFS, most FUSE) get
    /// `link` + `unlink`, and where hard links are refused too (vfat, directories), a
    /// `stat` check followed by a plain `rename`, which is racy and documented as such.
    pub(crate) fn rename_noreplace(
        &self,
        from: &OsStr,
        to_dir: &Dir,
        to: &OsStr,
    ) -> io::Result<()> {
        match rfs::renameat_with(&self.fd, from, &to_dir.fd, to, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(e) if !is_unsupported(e) => return Err(e.into()),
            Err(_) => {}
        }
        match rfs::linkat(&self.fd, from, &to_dir.fd, to, AtFlags::empty()) {
            Ok(()) => {
                // The new name is in place; a source name that vanished meanwhile was
                // removed by a recoverer cleaning up exactly this state.
                match rfs::unlinkat(&self.fd, from, AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) if e == rustix::io::Errno::PERM || is_unsupported(e) => {
                match rfs::statat(&to_dir.fd, to, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
                    Err(rustix::io::Errno::NOENT) => {
                        Ok(rfs::renameat(&self.fd, from, &to_dir.fd, to)?)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Swaps `from` in this directory and `to` in `to_dir` atomically
    /// (`renameat2(RENAME_EXCHANGE)`): both must exist, and at no moment is either name
    /// missing. `NotFound` when either is gone; `Unsupported` on a filesystem without
    /// it (NFS, most FUSE).
    pub(crate) fn exchange(&self, from: &OsStr, to_dir: &Dir, to: &OsStr) -> io::Result<()> {
        match rfs::renameat_with(&self.fd, from, &to_dir.fd, to, RenameFlags::EXCHANGE) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(e) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this filesystem cannot exchange two names atomically (renameat2 RENAME_EXCHANGE)",
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Plain `renameat`, replacing `to` if it exists (used for sidecar files only).
    pub(crate) fn rename_replace(&self, from: &OsStr, to_dir: &Dir, to: &OsStr) -> io::Result<()> {
        Ok(rfs::renameat(&self.fd, from, &to_dir.fd, to)?)
    }

    /// `fchmodat(name, mode)`, not following a symlink (Linux refuses to chmod one).
    pub(crate) fn chmod(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        Ok(rfs::chmodat(
            &self.fd,
            name,
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )?)
    }

    /// `unlinkat(name)` of a file.
    pub(crate) fn unlink(&self, name: &OsStr) -> io::Result<()> {
        Ok(rfs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// Removes the directory `name` and everything under it, relative to open
    /// directory handles all the way down and never following a symlink: a symlink
    /// inside is unlinked, not entered, so nothing outside the tree can be removed.
    /// For quarantined directories in `errors/`, which an operator deletes.
    pub(crate) fn remove_tree(&self, name: &OsStr) -> io::Result<()> {
        self.remove_tree_at(name, 0)
    }

    fn remove_tree_at(&self, name: &OsStr, depth: usize) -> io::Result<()> {
        // A bound on the recursion, so that a hostile tree cannot exhaust the stack.
        const MAX_DEPTH: usize = 64;
        if depth > MAX_DEPTH {
            return Err(io::Error::other(format!(
                "the directory tree is more than {MAX_DEPTH} levels deep"
            )));
        }
        let child = self.open_child(name)?;
        let mut entries = Vec::new();
        child.scan(&mut Vec::new(), |entry| {
            entries.push((entry.name.to_os_string(), entry.kind));
        })?;
        for (entry, kind) in entries {
            let kind = match kind {
                EntryKind::Unknown => child.stat_at(&entry)?.kind,
                known => known,
            };
            let removed = match kind {
                EntryKind::Dir => child.remove_tree_at(&entry, depth + 1),
                _ => child.unlink(&entry),
            };
            match removed {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(rfs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)?)
    }

    /// `fsync` of the directory: makes its entries durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        Ok(rfs::fsync(&self.fd)?)
    }

    /// Sets the directory's times to now (`futimens`): a metadata change of its own, in
    /// the filesystem's newest journal transaction, which a following [`sync`](Self::sync)
    /// therefore commits with every change made before it.
    pub(crate) fn touch(&self) -> io::Result<()> {
        let now = rfs::Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        };
        let times = rfs::Timestamps {
            last_access: now,
            last_modification: now,
        };
        Ok(rfs::futimens(&self.fd, &times)?)
    }

    /// Reads every entry but `.` and `..`, in directory order, into `visit`.
    ///
    /// A fresh descriptor is opened for each read so that concurrent scans of one queue
    /// never share a directory offset. `buf` is reused between scans.
    pub(crate) fn scan(
        &self,
        buf: &mut Vec<MaybeUninit<u8>>,
        mut visit: impl FnMut(RawEntry<'_>),
    ) -> io::Result<()> {
        let fd = rfs::openat(
            &self.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if buf.len() < SCAN_BUFFER_BYTES {
            buf.resize(SCAN_BUFFER_BYTES, MaybeUninit::uninit());
        }
        let mut dir = RawDir::new(fd, buf.as_mut_slice());
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            visit(RawEntry {
                name: OsStr::from_bytes(name),
                kind: convert_kind(entry.file_type()),
            });
        }
        Ok(())
    }

    /// Like [`scan`](Self::scan), but stops reading as soon as `visit` returns
    /// `false`: a bounded piece of work in a directory of any size.
    pub(crate) fn scan_while(
        &self,
        buf: &mut Vec<MaybeUninit<u8>>,
        mut visit: impl FnMut(RawEntry<'_>) -> bool,
    ) -> io::Result<()> {
        let fd = rfs::openat(
            &self.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if buf.len() < SCAN_BUFFER_BYTES {
            buf.resize(SCAN_BUFFER_BYTES, MaybeUninit::uninit());
        }
        let mut dir = RawDir::new(fd, buf.as_mut_slice());
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let more = visit(RawEntry {
                name: OsStr::from_bytes(name),
                kind: convert_kind(entry.file_type()),
            });
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// `unlinkat(name, AT_REMOVEDIR)`: removes an empty child directory.
    pub(crate) fn rmdir(&self, name: &OsStr) -> io::Result<()> {
        Ok(rfs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)?)
    }

    /// Classifies the filesystem the directory lives on.
    pub(crate) fn fs_family(&self) -> FsFamily {
        let Ok(statfs) = rfs::fstatfs(&self.fd) else {
            return FsFamily::Other;
        };
        #[allow(
            clippy::unnecessary_cast,
            reason = "f_type is i64 or u32 depending on the architecture"
        )]
        let magic = statfs.f_type as u64 & 0xffff_ffff;
        match magic {
            EXT_MAGIC => match self.stat() {
                Ok(st) if has_jbd2_journal(st.dev) => FsFamily::Journaled,
                _ => FsFamily::Other,
            },
            XFS_MAGIC => FsFamily::Journaled,
            TMPFS_MAGIC | RAMFS_MAGIC => FsFamily::Memory,
            NFS_MAGIC | SMB_MAGIC | CIFS_MAGIC | SMB2_MAGIC | CEPH_MAGIC => FsFamily::Network,
            FUSE_MAGIC => FsFamily::Fuse,
            _ => FsFamily::Other,
        }
    }

    /// Whether `renameat2(RENAME_NOREPLACE)` works here, found by trying it on a
    /// scratch file named `probe` (which must not exist and is removed again).
    pub(crate) fn supports_noreplace(&self, probe: &OsStr) -> io::Result<bool> {
        let mut target = probe.to_os_string();
        target.push(".renamed");
        drop(self.create_new(probe, 0o600)?);
        let result = rfs::renameat_with(&self.fd, probe, &self.fd, &target, RenameFlags::NOREPLACE);
        let supported = match result {
            Ok(()) => {
                let _ = rfs::unlinkat(&self.fd, &target, AtFlags::empty());
                true
            }
            Err(e) => {
                let _ = rfs::unlinkat(&self.fd, probe, AtFlags::empty());
                if is_unsupported(e) {
                    false
                } else {
                    return Err(e.into());
                }
            }
        };
        Ok(supported)
    }
}

fn is_unsupported(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    e == Errno::INVAL || e == Errno::NOSYS || e == Errno::OPNOTSUPP
}

const EXT_MAGIC: u64 = 0xEF53;
const XFS_MAGIC: u64 = 0x5846_5342;
const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;
const NFS_MAGIC: u64 = 0x6969;
const SMB_MAGIC: u64 = 0x517B;
const CIFS_MAGIC: u64 = 0xFF53_4D42;
const SMB2_MAGIC: u64 = 0xFE53_4D42;
const CEPH_MAGIC: u64 = 0x00C3_6400;
const FUSE_MAGIC: u64 = 0x6573_5546;

/// Whether the ext2/3/4 filesystem on device `dev` has a jbd2 journal: jbd2 registers
/// `/proc/fs/jbd2/<device>-<journal inode>` for each journal it runs. Without a journal
/// (for example `mkfs.ext4 -O ^has_journal`) a directory fsync commits only that
/// directory, so renames need both directories synced.
fn has_jbd2_journal(dev: u64) -> bool {
    let uevent = format!(
        "/sys/dev/block/{}:{}/uevent",
        rfs::major(dev),
        rfs::minor(dev)
    );
    let Ok(text) = std::fs::read_to_string(uevent) else {
        return false;
    };
    let Some(name) = text.lines().find_map(|l| l.strip_prefix("DEVNAME=")) else {
        return false;
    };
    let prefix = format!("{}-", name.replace('/', "!"));
    let Ok(entries) = std::fs::read_dir("/proc/fs/jbd2") else {
        return false;
    };
    entries
        .flatten()
        .any(|e| e.file_name().as_bytes().starts_with(prefix.as_bytes()))
}

/// Reads extended attribute `name` of `file`; `None` when it is not set or the
/// filesystem has no extended attributes.
pub(crate) fn get_xattr(file: &File, name: &str) -> io::Result<Option<Vec<u8>>> {
    get_xattr_sized(file, name, 64)
}

/// [`get_xattr`] for values of up to `max` bytes.
pub(crate) fn get_xattr_sized(file: &File, name: &str, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; max];
    match rfs::fgetxattr(file.as_fd(), name, &mut buf[..]) {
        Ok(n) => {
            buf.truncate(n);
            Ok(Some(buf))
        }
        Err(e) if is_no_xattr(e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Sets extended attribute `name` of `file`. Returns `false` when the filesystem does
/// not support user extended attributes.
pub(crate) fn set_xattr(file: &File, name: &str, value: &[u8]) -> io::Result<bool> {
    match rfs::fsetxattr(file.as_fd(), name, value, rfs::XattrFlags::empty()) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Removes extended attribute `name` of `file` if it is set.
pub(crate) fn remove_xattr(file: &File, name: &str) -> io::Result<()> {
    match rfs::fremovexattr(file.as_fd(), name) {
        Ok(()) => Ok(()),
        Err(e) if is_no_xattr(e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// How many times [`lock_owners`] reads `/proc/locks`.
const PROC_LOCKS_READS: usize = 3;

/// The processes holding `flock` locks on files of the device `dev`, by inode, from
/// `/proc/locks`. Empty where that file does not exist.
///
/// The file is read several times and every lock seen is reported. One read can miss a
/// lock held throughout: the kernel writes `/proc/locks` a page (some 80 locks) per
/// `read(2)` and finds its place again by counting, so a lock released meanwhile among
/// those already shown shifts the rest and the line at the boundary is never shown.
/// Under lock churn, 1 to 3 reads in 100 missed a held message's owner, and
/// `dirq ls` reported it as an orphan. A lock released during the call may be reported.
pub(crate) fn lock_owners(dev: u64) -> std::collections::HashMap<u64, u32> {
    let mut owners = std::collections::HashMap::new();
    for _ in 0..PROC_LOCKS_READS {
        let Ok(text) = std::fs::read_to_string("/proc/locks") else {
            break;
        };
        add_lock_owners(&text, dev, &mut owners);
    }
    owners
}

/// Adds to `owners` the `flock` holders of files of device `dev` in `text`, the
/// contents of `/proc/locks`.
fn add_lock_owners(text: &str, dev: u64, owners: &mut std::collections::HashMap<u64, u32>) {
    let wanted = (u64::from(rfs::major(dev)), u64::from(rfs::minor(dev)));
    for line in text.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" after the
        // number and are not owners.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            continue;
        }
        let (Some(pid), Some(file)) = (fields.get(4), fields.get(5)) else {
            continue;
        };
        let mut parts = file.split(':');
        let (Some(major), Some(minor), Some(ino)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let device = (
            u64::from_str_radix(major, 16).unwrap_or(u64::MAX),
            u64::from_str_radix(minor, 16).unwrap_or(u64::MAX),
        );
        if let (true, Ok(ino), Ok(pid)) = (device == wanted, ino.parse::<u64>(), pid.parse::<u32>())
        {
            owners.insert(ino, pid);
        }
    }
}

fn is_no_xattr(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    e == Errno::NODATA || e == Errno::OPNOTSUPP || e == Errno::RANGE
}

/// Delivers SIGTERM, SIGINT, SIGUSR1 and SIGHUP to `on_signal` on a thread of its own
/// until the returned watch is dropped. The handlers (from `signal-hook`) stay
/// installed afterwards, so the process no longer dies of those signals by default.
pub(crate) fn watch_signals(
    mut on_signal: impl FnMut(ProcessSignal) + Send + 'static,
) -> io::Result<SignalWatch> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])?;
    let handle = signals.handle();
    let thread = std::thread::Builder::new()
        .name("dirq-signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                on_signal(match signal {
                    SIGTERM => ProcessSignal::Terminate,
                    SIGINT => ProcessSignal::Interrupt,
                    SIGUSR1 => ProcessSignal::Statistics,
                    _ => ProcessSignal::Hangup,
                });
            }
        })?;
    Ok(SignalWatch {
        handle,
        thread: Some(thread),
    })
}

/// Stops delivering signals when dropped.
#[derive(Debug)]
pub(crate) struct SignalWatch {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Puts the command's process in a new process group of its own (its pid is the
/// group id), so that it and everything it starts can be signalled together.
pub(crate) fn new_process_group(command: &mut std::process::Command) {
    std::os::unix::process::CommandExt::process_group(command, 0);
}

/// Signals a whole process group. Errors (the group is gone) are ignored.
pub(crate) fn signal_group(group: u32, signal: super::GroupSignal) {
    let Some(pid) = i32::try_from(group)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let signal = match signal {
        super::GroupSignal::Terminate => rustix::process::Signal::TERM,
        super::GroupSignal::Kill => rustix::process::Signal::KILL,
    };
    let _ = rustix::process::kill_process_group(pid, signal);
}

/// Whether a process with this pid exists (in our pid namespace). A process we may not
/// signal (`EPERM`) exists too.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

/// Whether this process may execute `path`, as `execve` would: `Ok` for a file with
/// execute permission for us (`access(X_OK)`), an error (`NotFound`, `PermissionDenied`,
/// `EISDIR`) otherwise.
pub(crate) fn check_executable(path: &Path) -> io::Result<()> {
    if std::fs::metadata(path)?.is_dir() {
        return Err(rustix::io::Errno::ISDIR.into());
    }
    rfs::access(path, rfs::Access::EXEC_OK).map_err(io::Error::from)
}

/// The signal that killed a process, if one did.
pub(crate) fn killed_by(status: &std::process::ExitStatus) -> Option<i32> {
    std::os::unix::process::ExitStatusExt::signal(status)
}

/// Waits at most `timeout` for `child` to exit; `Ok(None)` when it is still running.
/// On Linux through a pidfd (exact, no polling); elsewhere by polling.
pub(crate) fn wait_child_timeout(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    #[cfg(target_os = "linux")]
    if let Some(pid) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        if let Ok(pidfd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if let Some(status) = child.try_wait()? {
                    return Ok(Some(status));
                }
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                let mut fds = [rustix::event::PollFd::new(
                    &pidfd,
                    rustix::event::PollFlags::IN,
                )];
                let timespec =
                    rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
                        tv_sec: i64::MAX,
                        tv_nsec: 0,
                    });
                match rustix::event::poll(&mut fds, Some(&timespec)) {
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

/// Whether an open failed because `O_NOFOLLOW` met a symbolic link (`ELOOP` on Linux,
/// `EMLINK` on FreeBSD).
pub(crate) fn is_symlink_refusal(e: &io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(rustix::io::Errno::LOOP.raw_os_error())
        || (cfg!(target_os = "freebsd") && code == Some(rustix::io::Errno::MLINK.raw_os_error()))
}

/// Whether a path lookup failed because a component is not a directory.
pub(crate) fn is_not_a_directory(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
}

/// Whether a rename failed because source and target are on different filesystems.
pub(crate) fn is_cross_device(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
}

/// Positional read: does not move the file offset, so readers never interfere.
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

/// Starts writing back the file's dirty pages without waiting (`POSIX_FADV_DONTNEED`
/// starts writeback of dirty pages; it cannot drop pages that are dirty or under
/// writeback). Called on every file of a batch before each is synced, so that their
/// writes overlap and the syncs mostly find their data already on the way.
pub(crate) fn start_writeback(file: &File) {
    let _ = rfs::fadvise(file.as_fd(), 0, None, rfs::Advice::DontNeed);
}

/// Writes the file's dirty pages to the device and waits until they are written
/// (`sync_file_range` with `WAIT_BEFORE | WRITE | WAIT_AFTER`), without a journal
/// commit or a cache flush of its own. The data is durable once a later journal commit
/// has completed: see [`Syncer::file`](crate::engine::durability::Syncer) for when that is
/// enough. Elsewhere than Linux, a plain `fdatasync`.
#[cfg(target_os = "linux")]
#[allow(
    unsafe_code,
    reason = "sync_file_range has no safe wrapper in rustix or std"
)]
pub(crate) fn write_back_and_wait(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: the descriptor is open for the duration of the call; the call reads no
    // memory of ours.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn write_back_and_wait(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// `fstat` of an open file.
pub(crate) fn stat_file(file: &File) -> io::Result<FileStat> {
    Ok(convert_stat(&rfs::fstat(file)?))
}

/// The host name, as `uname -n` prints it.
pub(crate) fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// A file name from its bytes.
pub(crate) fn os_string(bytes: Vec<u8>) -> std::ffi::OsString {
    std::os::unix::ffi::OsStringExt::from_vec(bytes)
}

/// The id of the calling process.
pub(crate) fn pid() -> u32 {
    std::process::id()
}

#[allow(
    clippy::unnecessary_cast,
    clippy::useless_conversion,
    reason = "struct stat field widths differ between architectures"
)]
fn convert_stat(st: &rfs::Stat) -> FileStat {
    FileStat {
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        kind: convert_kind(FileType::from_raw_mode(st.st_mode as rfs::RawMode)),
        nlink: st.st_nlink as u64,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode as u32 & 0o7777,
        mtime: to_system_time(st.st_mtime as i64, st.st_mtime_nsec as u32),
        ctime: to_system_time(st.st_ctime as i64, st.st_ctime_nsec as u32),
    }
}

fn to_system_time(secs: i64, nanos: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos.into())
    }
}

fn convert_kind(ft: FileType) -> EntryKind {
    match ft {
        FileType::RegularFile => EntryKind::File,
        FileType::Directory => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        FileType::Fifo => EntryKind::Fifo,
        FileType::Socket => EntryKind::Socket,
        FileType::CharacterDevice => EntryKind::CharDevice,
        FileType::BlockDevice => EntryKind::BlockDevice,
        _ => EntryKind::Unknown,
    }
}

/// A non-blocking, close-on-exec inotify descriptor watching a directory for entries
/// arriving (created or moved in), for a reactor to poll (the async claimers'
/// wake-up). The kernel always reports an overflow of its event queue, which also
/// reads as "look". The descriptor is private and never replaced, and closes on drop.
#[derive(Debug)]
pub(crate) struct ArrivalsWatch {
    fd: OwnedFd,
}

impl ArrivalsWatch {
    #[cfg(target_os = "linux")]
    pub(crate) fn new(dir: &Path) -> io::Result<ArrivalsWatch> {
        use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
        let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            dir,
            WatchFlags::CREATE | WatchFlags::MOVED_TO | WatchFlags::ONLYDIR,
        )?;
        Ok(ArrivalsWatch { fd })
    }

    /// Other Unix systems have no inotify: async claimers poll at the rescan interval.
    #[cfg(not(target_os = "linux"))]
    pub(crate) fn new(_dir: &Path) -> io::Result<ArrivalsWatch> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Reads and discards every pending event (they only say "look"); returns how many
    /// bytes there were. `WouldBlock` when there were none, as a reactor expects.
    #[cfg_attr(not(feature = "tokio"), expect(dead_code, reason = "used by aio only"))]
    pub(crate) fn drain(&self) -> io::Result<usize> {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        loop {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) if e == rustix::io::Errno::AGAIN && total > 0 => return Ok(total),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl std::os::fd::AsRawFd for ArrivalsWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_missing_from_one_read_of_proc_locks_is_still_reported() {
        let file = tempfile::tempfile().unwrap();
        let st = stat_file(&file).unwrap();
        assert!(crate::sys::lock::try_lock(&file).unwrap());
        let owners = lock_owners(st.dev);
        assert_eq!(owners.get(&st.ino), Some(&std::process::id()));

        // Two reads of /proc/locks, each missing a lock that the other shows (a lock
        // released between pages shifted the line at the boundary out of sight).
        let dev = format!("{:02x}:{:02x}", rfs::major(st.dev), rfs::minor(st.dev));
        let line = |n: u32, pid: u32, ino: u64| {
            format!("{n}: FLOCK  ADVISORY  WRITE {pid} {dev}:{ino} 0 EOF\n")
        };
        let reads = [
            line(1, 10, 100) + &line(2, 30, 300),
            line(1, 10, 100) + &line(2, 20, 200),
        ];
        let mut owners = std::collections::HashMap::new();
        for read in &reads {
            add_lock_owners(read, st.dev, &mut owners);
        }
        let want = [(100, 10), (200, 20), (300, 30)].into_iter().collect();
        assert_eq!(owners, want);
    }

    #[test]
    fn rename_noreplace_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        drop(dir.create_new(OsStr::new("a"), 0o644).unwrap());
        drop(dir.create_new(OsStr::new("b"), 0o644).unwrap());
        let err = dir
            .rename_noreplace(OsStr::new("a"), &dir, OsStr::new("b"))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        dir.rename_noreplace(OsStr::new("a"), &dir, OsStr::new("c"))
            .unwrap();
        assert!(tmp.path().join("c").exists());
        assert!(!tmp.path().join("a").exists());
    }

    #[test]
    fn scan_reports_kinds_without_following_links() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("l")).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let mut seen = Vec::new();
        let mut buf = Vec::new();
        dir.scan(&mut buf, |e| {
            seen.push((e.name.as_bytes().to_vec(), e.kind))
        })
        .unwrap();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            seen,
            vec![
                (b"d".to_vec(), EntryKind::Dir),
                (b"f".to_vec(), EntryKind::File),
                (b"l".to_vec(), EntryKind::Symlink),
            ]
        );
    }

    #[test]
    fn open_read_refuses_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("target"), b"secret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("target"), tmp.path().join("l")).unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert!(dir.open_read(OsStr::new("l")).is_err());
    }

    #[test]
    fn noreplace_probe_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert!(dir.supports_noreplace(OsStr::new(".probe")).unwrap());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
