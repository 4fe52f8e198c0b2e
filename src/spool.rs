//! Finding every queue under a spool directory.
//!
//! A *spool* is a directory tree that holds queues, such as Mentat's
//! `/var/mentat/spool`, with one queue per daemon. [`queues`] walks it and yields each
//! queue with its *name*: its path relative to the spool root, `/`-separated
//! (`"parse"`, `"site-a/enrich"`). An operator tool (`dirq status --spool ROOT`) or a
//! console can so show a whole spool without being told where each queue is.
//!
//! # What counts as a queue
//!
//! A directory is a queue when it holds the four state directories of Mentat's
//! protocol, `incoming/`, `pending/`, `errors/` and `tmp/`, each a real directory
//! and not a symbolic link (dirq's own `deferred/` and `hold/` are optional, as they
//! are when a queue is opened). The walk:
//!
//! - never looks inside a queue: not into its state directories (`incoming/` may hold a
//!   million files), and not for queues nested in it either, since `dirq check` counts
//!   anything else in a queue's root as misplaced;
//! - never enters a state directory of a directory that has some but not all of them
//!   (a damaged queue), for the same reason;
//! - does not follow symbolic links below the root (a link to a queue elsewhere is not
//!   reported twice, and a link loop cannot trap it); the root itself may be one;
//! - skips hidden directories, whose names start with `.` (`.dirq-*` scratch space,
//!   `.snapshot`, `.git`);
//! - stops at a maximum depth ([`Queues::max_depth`], default 4).
//!
//! The root itself may be a queue; its name is then the empty string `""` (the empty
//! path relative to the root), and nothing else is found under it.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Operation, Result};
use crate::format::history::HISTORY_DIR;
use crate::piper::PIPERS_DIR;
use crate::State;

/// How deep [`queues`] looks by default: a queue may be at most this many directories
/// below the root. Mentat's spool is one level deep; four leaves room for
/// `site/pipeline/stage` and keeps a mistyped root such as `/` from walking the whole
/// filesystem.
const DEFAULT_MAX_DEPTH: usize = 4;

/// Finds every queue under `root`, sorted by name.
///
/// See the [module documentation](self) for what counts as a queue and where the walk
/// looks. The walk happens at the first call to [`next`](Iterator::next), reading only
/// directories, never the contents of a state directory; the queues are then yielded
/// sorted by name, component by component as [`Path`] compares (`a/x` before `a-b`), and
/// each error at the place of the directory it is about.
///
/// # Errors
///
/// Each item is a [`Result`]. A directory that cannot be read or whose entries cannot
/// be looked up (no permission, a name too long, the root missing or not a directory)
/// is yielded as [`Error::Io`] with [`Operation::Scan`] and that directory's path, and
/// the iteration goes on with the rest of the tree: nothing under that directory is
/// reported, everything else is.
///
/// # Example
///
/// ```
/// use dirq::DirectoryQueue;
///
/// let spool = tempfile::tempdir().expect("a temporary directory");
/// DirectoryQueue::open(spool.path().join("parse"))?;
/// DirectoryQueue::open(spool.path().join("site-a/enrich"))?;
/// std::fs::create_dir(spool.path().join("archive")).expect("a plain directory");
///
/// let mut names = Vec::new();
/// for found in dirq::spool::queues(spool.path()) {
///     let found = found?; // or report the error and go on
///     assert!(found.path().join("incoming").is_dir());
///     names.push(found.name().to_owned());
/// }
/// assert_eq!(names, ["parse", "site-a/enrich"]);
///
/// // The root is a queue too, named "", when it has the state directories.
/// let parse = spool.path().join("parse");
/// let found: Vec<_> = dirq::spool::queues(&parse).collect::<Result<_, _>>()?;
/// assert_eq!(found.len(), 1);
/// assert_eq!((found[0].name(), found[0].path()), ("", parse.as_path()));
/// # Ok::<(), dirq::Error>(())
/// ```
pub fn queues(root: impl AsRef<Path>) -> Queues {
    Queues {
        root: root.as_ref().to_path_buf(),
        max_depth: DEFAULT_MAX_DEPTH,
        found: None,
    }
}

/// The queues under a spool root, sorted by name: see [`queues`].
#[derive(Debug)]
#[must_use = "iterators do nothing until iterated"]
pub struct Queues {
    root: PathBuf,
    max_depth: usize,
    /// The walk's results, sorted; `None` until the first `next`.
    found: Option<std::vec::IntoIter<Result<FoundQueue>>>,
}

impl Queues {
    /// How many directories below the root a queue may be: 0 looks at the root
    /// only, 1 at its children as well, and so on. Set it before the first call to
    /// `next`, when the walk happens; later calls have no effect.
    ///
    /// Default: 4.
    pub fn max_depth(mut self, depth: usize) -> Queues {
        self.max_depth = depth;
        self
    }

    /// The spool root, as given.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn walk(&self) -> Vec<Result<FoundQueue>> {
        // Unsorted on purpose: walkdir opens every directory it yields, and sorted it
        // also reads the whole of it before it can be skipped. Reading a queue's
        // `incoming/` with a million entries to throw them away is what the walk must
        // never do; unsorted, a skipped directory is opened and closed, not read.
        let mut walk = walkdir::WalkDir::new(&self.root)
            .follow_links(false)
            .max_depth(self.max_depth)
            .into_iter();
        // (sort key, item): the path relative to the root, compared by components.
        let mut found: Vec<(PathBuf, Result<FoundQueue>)> = Vec::new();
        // Whether the directory at each depth of the current branch is a damaged
        // queue, whose state directories are not entered.
        let mut damaged: Vec<bool> = Vec::new();
        while let Some(entry) = walk.next() {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let error = self.walk_error(e);
                    found.push((self.key(error.path()), Err(error)));
                    continue;
                }
            };
            let depth = entry.depth();
            let path = entry.path();
            damaged.truncate(depth);
            if depth == 0 {
                // The root may be a symlink (walkdir follows it); it must be a directory.
                match std::fs::metadata(path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        let e = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
                        found.push((PathBuf::new(), Err(Error::io(Operation::Scan, path, e))));
                        continue;
                    }
                    Err(e) => {
                        found.push((PathBuf::new(), Err(Error::io(Operation::Scan, path, e))));
                        continue;
                    }
                }
            } else {
                // Files, and symlinks to anything: walkdir does not descend into them.
                if !entry.file_type().is_dir() {
                    continue;
                }
                let name = entry.file_name();
                let parent_damaged = damaged.last().copied().unwrap_or(false);
                if is_hidden(name) || (parent_damaged && is_queue_dir_name(name)) {
                    walk.skip_current_dir();
                    continue;
                }
            }
            match Shape::of(path) {
                Ok(Shape::Queue) => {
                    // A queue is a leaf: walkdir opened it on yielding it, but has not
                    // read it yet, and now never will.
                    walk.skip_current_dir();
                    let relative = self.key(Some(path));
                    let name = name_of(&relative);
                    found.push((
                        relative,
                        Ok(FoundQueue {
                            path: path.to_path_buf(),
                            name,
                        }),
                    ));
                }
                Ok(shape) => {
                    if shape == Shape::Damaged {
                        tracing::debug!(path = %path.display(), "some state directories but not all: not a queue");
                    }
                    damaged.push(shape == Shape::Damaged);
                }
                Err(e) => {
                    // Do not descend: walkdir would report the same directory again.
                    walk.skip_current_dir();
                    found.push((
                        self.key(Some(path)),
                        Err(Error::io(Operation::Scan, path, e)),
                    ));
                }
            }
        }
        // Stable: a queue comes before an error about reading the same directory.
        found.sort_by(|a, b| a.0.cmp(&b.0));
        tracing::debug!(root = %self.root.display(), entries = found.len(), "scanned spool");
        found.into_iter().map(|(_, item)| item).collect()
    }

    /// The sort key of `path`: relative to the root, or empty.
    fn key(&self, path: Option<&Path>) -> PathBuf {
        path.and_then(|p| p.strip_prefix(&self.root).ok())
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn walk_error(&self, e: walkdir::Error) -> Error {
        let path = e.path().unwrap_or(&self.root).to_path_buf();
        // Without following links walkdir reports no loops: every error is an I/O error.
        let source = e
            .into_io_error()
            .unwrap_or_else(|| io::Error::other("filesystem loop"));
        Error::io(Operation::Scan, path, source)
    }
}

impl Iterator for Queues {
    type Item = Result<FoundQueue>;

    fn next(&mut self) -> Option<Result<FoundQueue>> {
        if self.found.is_none() {
            self.found = Some(self.walk().into_iter());
        }
        self.found.as_mut().and_then(Iterator::next)
    }
}

impl std::iter::FusedIterator for Queues {}

/// A queue found by [`queues`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundQueue {
    path: PathBuf,
    name: String,
}

impl FoundQueue {
    /// The queue's root directory: the spool root joined with the name. Open it with
    /// [`DirectoryQueue::open`](crate::DirectoryQueue::open) or a
    /// [builder](crate::DirectoryQueue::builder).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The queue's path relative to the spool root, with components separated by `/`
    /// on every platform: `"parse"`, `"site-a/enrich"`, or `""` for the root itself.
    /// A component that is not valid UTF-8 is converted lossily (with U+FFFD); use
    /// [`path`](FoundQueue::path) to reach the directory.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for FoundQueue {
    /// The name, or `.` for the spool root itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            f.write_str(".")
        } else {
            f.write_str(&self.name)
        }
    }
}

/// What a directory is, judged by its Mentat state directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// All four, each a real directory.
    Queue,
    /// Some but not all: a damaged queue, not reported, whose state directories are
    /// not entered.
    Damaged,
    /// None: a plain directory, searched further.
    Plain,
}

impl Shape {
    fn of(dir: &Path) -> io::Result<Shape> {
        let mut present = 0;
        for state in State::MENTAT {
            // lstat: a symlink named `incoming` does not make a queue.
            match std::fs::symlink_metadata(dir.join(state.as_str())) {
                Ok(meta) if meta.file_type().is_dir() => present += 1,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(match present {
            0 => Shape::Plain,
            n if n == State::MENTAT.len() => Shape::Queue,
            _ => Shape::Damaged,
        })
    }
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// Whether `name` is one of the directories a queue keeps in its root.
fn is_queue_dir_name(name: &OsStr) -> bool {
    State::ALL.iter().any(|s| OsStr::new(s.as_str()) == name)
        || name == PIPERS_DIR
        || name == HISTORY_DIR
}

fn name_of(relative: &Path) -> String {
    let parts: Vec<_> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirectoryQueue;

    fn make_queue(path: &Path) {
        DirectoryQueue::open(path).unwrap();
    }

    /// Names found, with errors as `error: <path relative to root>`.
    fn names(queues: Queues) -> Vec<String> {
        let root = queues.root().to_path_buf();
        queues
            .map(|item| match item {
                Ok(found) => found.name().to_owned(),
                Err(e) => {
                    assert_eq!(e.operation(), Some(Operation::Scan), "{e}");
                    let path = e.path().unwrap().strip_prefix(&root).unwrap();
                    format!("error: {}", path.display())
                }
            })
            .collect()
    }

    #[test]
    fn nested_queues_are_found_sorted_by_components() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["b", "a-c", "a/y", "a/x", "deep/er/still"] {
            make_queue(&root.join(name));
        }
        std::fs::create_dir_all(root.join("empty/plain")).unwrap();
        std::fs::write(root.join("a/NOTES"), b"a file is not a queue").unwrap();
        assert_eq!(
            names(queues(root)),
            ["a/x", "a/y", "a-c", "b", "deep/er/still"]
        );
        let found: Vec<_> = queues(root).map(Result::unwrap).collect();
        assert_eq!(found[0].path(), root.join("a/x"));
        assert_eq!(found[0].to_string(), "a/x");
    }

    #[test]
    fn root_queue_is_named_empty_and_is_a_leaf() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("q");
        make_queue(&root);
        // Even a queue-shaped directory inside a queue is not searched for.
        make_queue(&root.join("incoming/inner"));
        make_queue(&root.join("stray"));
        let found: Vec<_> = queues(&root).map(Result::unwrap).collect();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].name(), found[0].path()), ("", root.as_path()));
        assert_eq!(found[0].to_string(), ".");
    }

    #[test]
    fn a_directory_without_all_four_real_state_dirs_is_not_a_queue() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for state in ["incoming", "pending", "errors"] {
            std::fs::create_dir_all(root.join("three").join(state)).unwrap();
        }
        // A damaged queue's state directories are not entered, its other ones are.
        make_queue(&root.join("three/incoming/hidden-by-damage"));
        make_queue(&root.join("three/other"));
        for state in ["incoming", "pending", "errors"] {
            std::fs::create_dir_all(root.join("file-tmp").join(state)).unwrap();
        }
        std::fs::write(root.join("file-tmp/tmp"), b"").unwrap();
        make_queue(&root.join("real"));
        assert_eq!(names(queues(root)), ["real", "three/other"]);
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_not_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        make_queue(&dir.path().join("elsewhere"));
        std::fs::create_dir(&root).unwrap();
        symlink(dir.path().join("elsewhere"), root.join("link")).unwrap();
        // A queue whose `tmp` is a symlink to a directory is not a queue.
        let fake = root.join("fake");
        for state in ["incoming", "pending", "errors"] {
            std::fs::create_dir_all(fake.join(state)).unwrap();
        }
        symlink(dir.path().join("elsewhere/tmp"), fake.join("tmp")).unwrap();
        assert!(names(queues(&root)).is_empty());

        // The root itself may be a symlink.
        let root_link = dir.path().join("root-link");
        symlink(dir.path().join("elsewhere"), &root_link).unwrap();
        assert_eq!(names(queues(&root_link)), [""]);
    }

    #[test]
    fn hidden_directories_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_queue(&root.join(".dirq-old/q"));
        make_queue(&root.join(".hidden"));
        make_queue(&root.join("shown"));
        assert_eq!(names(queues(root)), ["shown"]);
        // A hidden root is searched: the rule is about what the walk finds.
        assert_eq!(names(queues(root.join(".dirq-old"))), ["q"]);
    }

    #[test]
    fn depth_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_queue(&root.join("1/2/3/4/5"));
        make_queue(&root.join("1/2/3/4"));
        make_queue(&root.join("one"));
        assert_eq!(names(queues(root)), ["1/2/3/4", "one"]);
        assert_eq!(names(queues(root).max_depth(5)), ["1/2/3/4", "one"]);
        assert_eq!(names(queues(root).max_depth(1)), ["one"]);
        assert!(names(queues(root).max_depth(0)).is_empty());
        // Hidden behind 1/2/3/4 being a queue; found from below it.
        assert_eq!(names(queues(root.join("1/2/3/4/5"))), [""]);
    }

    #[test]
    fn a_missing_or_non_directory_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let errors: Vec<_> = queues(&missing).collect();
        assert_eq!(errors.len(), 1);
        let e = errors[0].as_ref().unwrap_err();
        assert_eq!(e.path(), Some(missing.as_path()));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            e.to_string(),
            format!("failed to scan {}", missing.display())
        );

        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let errors: Vec<_> = queues(&file).collect();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].as_ref().unwrap_err().kind(),
            io::ErrorKind::NotADirectory
        );
    }

    /// A directory nobody can look into, root included: its path is longer than
    /// PATH_MAX, so every system call on it fails with ENAMETOOLONG.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_unreadable_directory_is_an_error_and_the_walk_goes_on() {
        use rustix::fs::{mkdirat, openat, Mode, OFlags};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_queue(&root.join("before"));
        make_queue(&root.join("zz-after"));
        // Built relative to directory descriptors: no single path may be that long.
        let name = "d".repeat(200);
        let mut fd = openat(rustix::fs::CWD, root, OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut path = root.to_path_buf();
        let mut depth = 0;
        while path.as_os_str().len() <= 4096 {
            mkdirat(&fd, name.as_str(), Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(&fd, name.as_str(), OFlags::DIRECTORY, Mode::empty()).unwrap();
            path.push(&name);
            depth += 1;
        }
        let found = names(queues(root).max_depth(depth + 1));
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0], "before");
        assert!(found[1].starts_with("error: dddd"), "{found:?}");
        assert_eq!(found[2], "zz-after");
        let e = queues(root)
            .max_depth(depth + 1)
            .find_map(Result::err)
            .unwrap();
        let errno = e.io_error().and_then(io::Error::raw_os_error);
        assert_eq!(errno, Some(rustix::io::Errno::NAMETOOLONG.raw_os_error()));
    }

    /// The same through permissions, for a user the permissions apply to.
    #[cfg(unix)]
    #[test]
    fn a_directory_without_permission_is_an_error_and_the_walk_goes_on() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_queue(&root.join("a/q"));
        make_queue(&root.join("b"));
        let closed = root.join("a");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o000)).unwrap();
        let readable = std::fs::read_dir(&closed).is_ok();
        let found = names(queues(root));
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
        if readable {
            eprintln!("skipped: permissions do not apply to this user (root)");
            return;
        }
        assert_eq!(found, ["error: a", "b"]);
    }
}
