//! `dirq edit QUEUE ID`: new content for a waiting message, from an editor or a file,
//! put in place atomically under the same id unless a worker claimed it meanwhile.

use std::ffi::OsStr;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use dirq::{DirectoryQueue, MessageId, State};

use crate::output::{context, quiet_broken_pipe, stdout_error, CliResult};

/// Where the new content comes from.
enum Source {
    /// A copy the operator edited with `$VISUAL`/`$EDITOR`.
    Editor(PathBuf),
    /// `--from FILE`.
    File(PathBuf),
    /// `--from -`.
    Stdin,
}

pub(crate) fn edit(queue: &DirectoryQueue, id: &OsStr, from: Option<&Path>) -> CliResult {
    let id = MessageId::new(id)?;
    let failed = |why: &str| format!("failed to edit {} in {}: {why}", id, queue.root().display());
    let (state, original) = dirq::admin::peek(queue, &id)?;
    if !matches!(state, State::Incoming | State::Deferred | State::Hold) {
        return Err(failed(&format!(
            "the message is in {state}/; only a waiting message (incoming, deferred or hold) \
             can be edited"
        ))
        .into());
    }
    let source = match from {
        Some(path) if path == Path::new("-") => Source::Stdin,
        Some(path) => Source::File(path.to_path_buf()),
        None if !io::stdin().is_terminal() => {
            return Err(failed("no terminal to run an editor in: give --from FILE").into())
        }
        None => Source::Editor(edit_copy(&id, &original)?),
    };
    let edited = match &source {
        Source::Editor(copy) => {
            run_editor(copy).map_err(|why| {
                failed(&format!(
                    "{why}; the message is unchanged, and the copy is in {}",
                    copy.display()
                ))
            })?;
            read(copy)?
        }
        Source::File(path) => read(path)?,
        Source::Stdin => {
            let mut bytes = Vec::new();
            io::stdin()
                .read_to_end(&mut bytes)
                .map_err(context("failed to read standard input"))?;
            bytes
        }
    };
    let mut out = io::stdout().lock();
    if edited == original {
        if let Source::Editor(copy) = &source {
            let _ = std::fs::remove_file(copy);
        }
        quiet_broken_pipe(writeln!(out, "{id}: unchanged")).map_err(stdout_error)?;
        return Ok(());
    }
    match dirq::admin::replace(queue, &id, &edited) {
        Ok(state) => {
            if let Source::Editor(copy) = &source {
                let _ = std::fs::remove_file(copy);
            }
            quiet_broken_pipe(writeln!(out, "{id}: edited in {state}/")).map_err(stdout_error)?;
            Ok(())
        }
        Err(e) => {
            // The edit is never lost: say where it is.
            let kept = match source {
                Source::Editor(copy) => copy,
                Source::File(path) => path,
                Source::Stdin => edit_copy(&id, &edited)?,
            };
            Err(format!("{e}; your edit is kept in {}", kept.display()).into())
        }
    }
}

/// A private copy of `bytes` for the editor (mode 0600, a fresh name in the temporary
/// directory).
fn edit_copy(id: &MessageId, bytes: &[u8]) -> Result<PathBuf, crate::output::Context> {
    let dir = std::env::temp_dir();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut n = 0;
    loop {
        let path = dir.join(match n {
            0 => format!("dirq-edit-{id}"),
            n => format!("dirq-edit-{id}.{n}"),
        });
        match options.open(&path) {
            Ok(mut file) => {
                file.write_all(bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(context(format!("failed to write {}", path.display())))?;
                return Ok(path);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(context(format!("failed to create {}", path.display()))(e)),
        }
    }
}

/// Runs `$VISUAL`, else `$EDITOR`, else `vi` on `path`, through `sh` so that an editor
/// with arguments (`code --wait`) works.
fn run_editor(path: &Path) -> Result<(), String> {
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|e| !e.is_empty())
        .unwrap_or_else(|| "vi".into());
    let mut script = editor.clone();
    script.push(" \"$1\"");
    let status = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg("sh")
        .arg(path)
        .status()
        .map_err(|e| format!("cannot run the editor {editor:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the editor {editor:?} exited with {status}"))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, crate::output::Context> {
    std::fs::read(path).map_err(context(format!("failed to read {}", path.display())))
}
