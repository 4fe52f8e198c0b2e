//! Reading and writing the failure sidecar `errors/<id>.meta` (its format is in
//! `format::meta`).

use std::ffi::{OsStr, OsString};
use std::io::Write;

use super::Shared;
use crate::error::{Error, Operation, Result};
use crate::format::id::{MessageId, META_SUFFIX};
use crate::format::meta::{sidecar_name, FailureInfo};
use crate::format::state::State;

/// Writes the sidecar for the entry `name` in `errors/`, replacing any older one:
/// written in `tmp/`, synced, then renamed into place, so that a reader never sees a
/// partial sidecar.
///
/// # Durability
///
/// The file's bytes are synced (unless `Durability::None`); the rename is not:
/// the caller orders it before the message's own move.
pub(crate) fn write_sidecar(queue: &Shared, name: &OsStr, info: &FailureInfo) -> Result<()> {
    let tmp = queue.dir(State::Tmp);
    let errors = queue.dir(State::Errors);
    let tmp_name = OsString::from(format!("{}{META_SUFFIX}", MessageId::generate()));
    let tmp_path = tmp.join(&tmp_name);
    let json = serde_json::to_vec_pretty(info)
        .map_err(|e| Error::json(Operation::Encode, &tmp_path, e))?;
    let result = (|| {
        let mut file = tmp
            .dir
            .create_new(&tmp_name, queue.config.file_mode)
            .map_err(|e| Error::io(Operation::Create, &tmp_path, e))?;
        file.write_all(&json)
            .map_err(|e| Error::io(Operation::Write, &tmp_path, e))?;
        queue.syncer.file(&file, &tmp_path)?;
        let target = sidecar_name(name);
        tmp.dir
            .rename_replace(&tmp_name, &errors.dir, &target)
            .map_err(|e| Error::moving(Operation::Metadata, &tmp_path, errors.join(&target), e))
    })();
    if result.is_err() {
        let _ = tmp.dir.unlink(&tmp_name);
    }
    result
}

/// Reads the sidecar of the entry `name` in `errors/`; `None` when there is none.
pub(crate) fn read_sidecar(queue: &Shared, name: &OsStr) -> Result<Option<FailureInfo>> {
    let errors = queue.dir(State::Errors);
    let sidecar = sidecar_name(name);
    let path = errors.join(&sidecar);
    let file = match errors.dir.open_read(&sidecar) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(Operation::Read, path, e)),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::BufReader::new(file).take_limit(), &mut bytes)
        .map_err(|e| Error::io(Operation::Read, &path, e))?;
    // Mentat's daemons may write any JSON value; anything but an object means "no details".
    match serde_json::from_slice::<FailureInfo>(&bytes) {
        Ok(info) => Ok(Some(info)),
        Err(_) if serde_json::from_slice::<serde_json::Value>(&bytes).is_ok() => {
            Ok(Some(FailureInfo::default()))
        }
        Err(e) => Err(Error::json(Operation::Decode, path, e)),
    }
}

/// Sidecars are small; a huge one is not read whole.
trait TakeLimit: std::io::Read + Sized {
    fn take_limit(self) -> std::io::Take<Self> {
        self.take(1 << 20)
    }
}

impl<R: std::io::Read> TakeLimit for R {}
