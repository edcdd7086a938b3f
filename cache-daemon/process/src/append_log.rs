//! One way to keep local state across a crash: a file of JSON values, one per line.
//!
//! Every persisted record of Granary's node side is one of these (the inode tables' operation
//! logs, the write-back journal, the serving epoch, the node daemon's mount records), so they
//! share one durability rule:
//! - an append is a single `write` of one whole line, so a crash leaves whole lines and at most
//!   one torn last line;
//! - reading drops a torn last line (one without its newline: what it described never happened
//!   for anyone else) and refuses any other bad line, naming the file and the line: that is
//!   corruption, not a crash;
//! - a rewrite (compaction, a snapshot) is written aside and renamed over the log, so a reader
//!   sees the old contents or the new, never a mix;
//! - [`Durability`] says what the log must outlive: the process (no fsync), or the machine
//!   (rewrites fsync the file and its directory; [`AppendLog::sync`] fsyncs appends).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::marker::PhantomData;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// What a log must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The death of the process: the page cache keeps what was written. For state that only
    /// matters while the kernel mount lives (a reboot ends it).
    Process,
    /// The loss of the machine's power: rewrites are fsynced with their directory, and
    /// [`AppendLog::sync`] makes appends durable.
    Machine,
}

/// How a log's file is made.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    pub durability: Durability,
    /// Permission bits of a file the log creates (0o600 for a file holding secrets).
    pub mode: u32,
}

impl LogOptions {
    pub const fn new(durability: Durability) -> Self {
        LogOptions {
            durability,
            mode: 0o644,
        }
    }

    pub const fn mode(self, mode: u32) -> Self {
        LogOptions { mode, ..self }
    }
}

/// An open log of `T`s.
pub struct AppendLog<T> {
    file: File,
    path: PathBuf,
    options: LogOptions,
    /// Lines in the file (read, rewritten or appended).
    lines: u64,
    /// Lines appended since the last rewrite.
    appended: u64,
    _records: PhantomData<fn(T)>,
}

impl<T: Serialize + DeserializeOwned> AppendLog<T> {
    /// Every record of the log at `path` (none if there is no file), by the rule above.
    pub fn read(path: &Path) -> io::Result<Vec<T>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // Only a last line without its newline can be torn: every append writes line and
        // newline in one `write`, and rewrites are renamed into place whole.
        let torn_tail = !text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut records = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(r) => records.push(r),
                Err(_) if torn_tail && i + 1 == lines.len() => {
                    tracing::warn!(log = %path.display(), "dropping a torn last record");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{} line {}: {e}; the file is corrupt (not torn by a crash): move it aside to start over",
                            path.display(),
                            i + 1
                        ),
                    ))
                }
            }
        }
        Ok(records)
    }

    /// The records of the log at `path` and the log, open to go on appending (created empty if
    /// there was none).
    pub fn open(path: &Path, options: LogOptions) -> io::Result<(Self, Vec<T>)> {
        let records = Self::read(path)?;
        create_parent(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(options.mode)
            .open(path)?;
        let mut log = Self::from_file(file, path, options);
        log.lines = records.len() as u64;
        Ok((log, records))
    }

    /// A new, empty log at `path`, replacing any there was.
    pub fn create(path: &Path, options: LogOptions) -> io::Result<Self> {
        Self::replace(path, options, std::iter::empty())
    }

    /// The log at `path` replaced by `records` (by the rewrite rule), open for appending.
    pub fn replace<'a>(path: &Path, options: LogOptions, records: impl IntoIterator<Item = &'a T>) -> io::Result<Self>
    where
        T: 'a,
    {
        create_parent(path)?;
        let lines = write_aside(path, options, records)?;
        let file = OpenOptions::new().append(true).open(path)?;
        let mut log = Self::from_file(file, path, options);
        log.lines = lines;
        Ok(log)
    }

    /// Replaces this log's contents with `records` (compaction).
    pub fn rewrite<'a>(&mut self, records: impl IntoIterator<Item = &'a T>) -> io::Result<()>
    where
        T: 'a,
    {
        self.lines = write_aside(&self.path, self.options, records)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.appended = 0;
        Ok(())
    }

    /// Appends one record with a single write.
    pub fn append(&mut self, record: &T) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.lines += 1;
        self.appended += 1;
        Ok(())
    }

    /// Makes the appends so far survive the machine.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Lines in the file.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Records appended since the log was last rewritten.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn from_file(file: File, path: &Path, options: LogOptions) -> Self {
        AppendLog {
            file,
            path: path.to_path_buf(),
            options,
            lines: 0,
            appended: 0,
            _records: PhantomData,
        }
    }
}

fn create_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

/// Writes `records` to a file beside `path` and renames it over `path`; returns the lines written.
fn write_aside<'a, T: Serialize + 'a>(
    path: &Path,
    options: LogOptions,
    records: impl IntoIterator<Item = &'a T>,
) -> io::Result<u64> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".rewrite");
    let tmp = PathBuf::from(tmp);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(options.mode)
        .open(&tmp)?;
    let mut out = io::BufWriter::new(file);
    let mut lines = 0;
    for r in records {
        serde_json::to_writer(&mut out, r).map_err(io::Error::other)?;
        out.write_all(b"\n")?;
        lines += 1;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    if options.durability == Durability::Machine {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(&tmp, path)?;
    if options.durability == Durability::Machine {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const PROCESS: LogOptions = LogOptions::new(Durability::Process);

    fn tail(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_log_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.log");
        let mut log = AppendLog::<(u64, String)>::create(&path, PROCESS).unwrap();
        log.append(&(2, "a b\n\"c\"".into())).unwrap();
        log.append(&(3, "d".into())).unwrap();
        drop(log);
        // A process killed mid-write leaves half a line.
        tail(&path, b"[4,\"tor");
        let (mut log, records) = AppendLog::<(u64, String)>::open(&path, PROCESS).unwrap();
        assert_eq!(records, vec![(2, "a b\n\"c\"".to_string()), (3, "d".to_string())]);
        // Compaction replaces the torn tail too, and appends land after it on a fresh line.
        log.rewrite(records.iter().take(1)).unwrap();
        log.append(&(5, "e".into())).unwrap();
        assert_eq!((log.lines(), log.appended()), (2, 1));
        drop(log);
        let records = AppendLog::<(u64, String)>::read(&path).unwrap();
        assert_eq!(records, vec![(2, "a b\n\"c\"".to_string()), (5, "e".to_string())]);
    }

    #[test]
    fn a_bad_line_before_the_last_is_corruption_and_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let log = AppendLog::<u64>::replace(&path, PROCESS, &[1, 2]).unwrap();
        drop(log);
        tail(&path, b"{not json\n3\n");
        let err = AppendLog::<u64>::read(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("line 3"), "{err}");
        // Opening refuses it too, and leaves the file as it was.
        assert!(AppendLog::<u64>::open(&path, PROCESS).is_err());
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("{not json\n3\n"));
    }

    #[test]
    fn a_missing_log_is_empty_and_a_replaced_one_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/mounts.jsonl");
        assert!(AppendLog::<u64>::read(&path).unwrap().is_empty());
        let options = LogOptions::new(Durability::Machine).mode(0o600);
        let mut log = AppendLog::<u64>::replace(&path, options, &[7]).unwrap();
        log.append(&8).unwrap();
        log.sync().unwrap();
        log.rewrite(&[9]).unwrap();
        assert_eq!(AppendLog::<u64>::read(&path).unwrap(), vec![9]);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
