//! Platforms without the system calls the protocol needs: every operation returns
//! [`io::ErrorKind::Unsupported`] at run time, so that the crate still builds.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::path::Path;

use super::{FileStat, FsFamily, ProcessSignal, RawEntry};

fn unsupported<T>() -> io::Result<T> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "dirq needs openat, renameat2 and flock: only Unix is supported",
    ))
}

#[derive(Debug)]
pub(crate) struct Dir(());

impl Dir {
    pub(crate) fn open(_path: &Path) -> io::Result<Dir> {
        unsupported()
    }
    pub(crate) fn open_child(&self, _name: &OsStr) -> io::Result<Dir> {
        unsupported()
    }
    pub(crate) fn mkdir(&self, _name: &OsStr, _mode: u32) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn stat(&self) -> io::Result<FileStat> {
        unsupported()
    }
    pub(crate) fn stat_at(&self, _name: &OsStr) -> io::Result<FileStat> {
        unsupported()
    }
    pub(crate) fn open_read(&self, _name: &OsStr) -> io::Result<File> {
        unsupported()
    }
    pub(crate) fn open_write(&self, _name: &OsStr) -> io::Result<File> {
        unsupported()
    }
    pub(crate) fn open_append(&self, _name: &OsStr, _mode: u32) -> io::Result<File> {
        unsupported()
    }
    pub(crate) fn create_new(&self, _name: &OsStr, _mode: u32) -> io::Result<File> {
        unsupported()
    }
    pub(crate) fn rename_noreplace(
        &self,
        _from: &OsStr,
        _to_dir: &Dir,
        _to: &OsStr,
    ) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn exchange(&self, _from: &OsStr, _to_dir: &Dir, _to: &OsStr) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn rename_replace(
        &self,
        _from: &OsStr,
        _to_dir: &Dir,
        _to: &OsStr,
    ) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn chmod(&self, _name: &OsStr, _mode: u32) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn unlink(&self, _name: &OsStr) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn remove_tree(&self, _name: &OsStr) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn sync(&self) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn scan_while(
        &self,
        _buf: &mut Vec<MaybeUninit<u8>>,
        _visit: impl FnMut(RawEntry<'_>) -> bool,
    ) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn rmdir(&self, _name: &OsStr) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn touch(&self) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn scan(
        &self,
        _buf: &mut Vec<MaybeUninit<u8>>,
        _visit: impl FnMut(RawEntry<'_>),
    ) -> io::Result<()> {
        unsupported()
    }
    pub(crate) fn fs_family(&self) -> FsFamily {
        FsFamily::Other
    }
    pub(crate) fn supports_noreplace(&self, _probe: &OsStr) -> io::Result<bool> {
        unsupported()
    }
}

pub(crate) fn get_xattr(_file: &File, _name: &str) -> io::Result<Option<Vec<u8>>> {
    Ok(None)
}

pub(crate) fn get_xattr_sized(
    _file: &File,
    _name: &str,
    _max: usize,
) -> io::Result<Option<Vec<u8>>> {
    Ok(None)
}

pub(crate) fn set_xattr(_file: &File, _name: &str, _value: &[u8]) -> io::Result<bool> {
    Ok(false)
}

pub(crate) fn start_writeback(_file: &File) {}

pub(crate) fn write_back_and_wait(file: &File) -> io::Result<()> {
    file.sync_data()
}

pub(crate) fn remove_xattr(_file: &File, _name: &str) -> io::Result<()> {
    Ok(())
}

pub(crate) fn lock_owners(_dev: u64) -> std::collections::HashMap<u64, u32> {
    std::collections::HashMap::new()
}

pub(crate) fn stat_file(_file: &File) -> io::Result<FileStat> {
    unsupported()
}

pub(crate) fn is_symlink_refusal(_e: &io::Error) -> bool {
    false
}

pub(crate) fn is_not_a_directory(_e: &io::Error) -> bool {
    false
}

pub(crate) fn is_cross_device(_e: &io::Error) -> bool {
    false
}

pub(crate) fn read_at(_file: &File, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
    unsupported()
}

pub(crate) fn hostname() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "localhost".to_owned())
}

pub(crate) fn pid() -> u32 {
    std::process::id()
}

#[derive(Debug)]
pub(crate) struct SignalWatch;

pub(crate) fn watch_signals(
    _on_signal: impl FnMut(ProcessSignal) + Send + 'static,
) -> io::Result<SignalWatch> {
    unsupported()
}

pub(crate) fn new_process_group(_command: &mut std::process::Command) {}

pub(crate) fn signal_group(_group: u32, _signal: super::GroupSignal) {}

/// Without a way to ask, every process counts as alive: nothing is cleaned up on a guess.
pub(crate) fn process_alive(_pid: u32) -> bool {
    true
}

/// Without execute permission bits to read, only whether `path` exists.
pub(crate) fn check_executable(path: &Path) -> io::Result<()> {
    std::fs::metadata(path).map(|_| ())
}

pub(crate) fn killed_by(_status: &std::process::ExitStatus) -> Option<i32> {
    None
}

pub(crate) fn wait_child_timeout(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A file name from its bytes (lossy where names are not bytes).
pub(crate) fn os_string(bytes: Vec<u8>) -> std::ffi::OsString {
    String::from_utf8_lossy(&bytes).into_owned().into()
}

/// No inotify here: async claimers poll at the rescan interval.
#[derive(Debug)]
pub(crate) struct ArrivalsWatch;

impl ArrivalsWatch {
    pub(crate) fn new(_dir: &Path) -> io::Result<ArrivalsWatch> {
        unsupported()
    }

    #[cfg_attr(not(feature = "tokio"), expect(dead_code, reason = "used by aio only"))]
    pub(crate) fn drain(&self) -> io::Result<usize> {
        unsupported()
    }
}
