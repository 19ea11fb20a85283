//! The decision journal: one JSON line per transition or analysis that changed something,
//! appended to `state.dir/journal.jsonl` with the numbers behind it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

use super::judge::Judgement;

/// One journal line.
#[derive(Clone, Debug, Serialize)]
pub struct Entry<'a> {
    pub at: String,
    pub route: &'a str,
    /// `transition` (the phase or weight changed) or `analysis` (the failure count changed).
    pub event: &'static str,
    pub action: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub stable: &'static str,
    pub weight_from: f64,
    pub weight_to: f64,
    /// The step after the change, as the admin API shows it (from 1; 0 with no rollout).
    pub step: usize,
    pub failures: u32,
    pub reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judgement: Option<&'a Judgement>,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("journal.jsonl"),
            file: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line. Never called on the request path. A last line cut short (veer
    /// killed mid-write, a full disk) is ended first, so that it costs only itself and not the
    /// entry written after it.
    pub fn append(&self, entry: &Entry<'_>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.opened()?;
        let Some(file) = guard.as_mut() else {
            return Ok(());
        };
        // Unknown (the check failed): the entry is written all the same.
        if ends_cut(file).unwrap_or(false) {
            tracing::warn!(path = %self.path.display(), "The journal's last line was cut short; it is ended before the next entry.");
            line.insert(0, b'\n');
        }
        file.write_all(&line)
    }

    /// Opens the file for appending (creating it and its directory) unless it is open.
    pub fn open(&self) -> std::io::Result<()> {
        self.opened().map(drop)
    }

    fn opened(&self) -> std::io::Result<MutexGuard<'_, Option<File>>> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("journal lock poisoned"))?;
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir)?;
            }
            *guard = Some(
                OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        Ok(guard)
    }

    /// The newest `limit` entries, newest first (reads at most the last 4 MiB of the file).
    pub fn tail(&self, limit: usize) -> std::io::Result<Vec<serde_json::Value>> {
        const MAX_READ: u64 = 4 << 20;
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let len = file.metadata()?.len();
        let start = len.saturating_sub(MAX_READ);
        file.seek(SeekFrom::Start(start))?;
        // Bytes, not text: a line cut inside a character (a crash mid-write, or this read's
        // start) must cost only itself, not every read of the journal.
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut lines = bytes.split(|&b| b == b'\n');
        if start > 0 {
            lines.next(); // possibly cut in the middle
        }
        Ok(lines
            .rev()
            .filter_map(|line| serde_json::from_slice(line).ok())
            .filter(serde_json::Value::is_object)
            .take(limit)
            .collect())
    }
}

/// Whether the file's last byte is not the end of a line.
fn ends_cut(file: &File) -> std::io::Result<bool> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    Ok(last[0] != b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `reason` of each entry of the tail, newest first.
    fn reasons(journal: &Journal) -> Vec<serde_json::Value> {
        let tail = journal.tail(10).unwrap();
        tail.into_iter().map(|e| e["reason"].clone()).collect()
    }

    fn entry(reason: &str) -> Entry<'_> {
        Entry {
            at: now_rfc3339(),
            route: "shop",
            event: "transition",
            action: "start",
            from: "idle",
            to: "ramping",
            stable: "blue",
            weight_from: 0.0,
            weight_to: 1.0,
            step: 1,
            failures: 0,
            reason,
            judgement: None,
        }
    }

    #[test]
    fn tail_returns_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        assert!(journal.tail(10).unwrap().is_empty());
        for reason in ["a", "b", "c"] {
            journal.append(&entry(reason)).unwrap();
        }
        let tail = journal.tail(2).unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0]["reason"], "c");
        assert_eq!(tail[1]["reason"], "b");
        assert_eq!(tail[0]["weight_to"], 1.0);
    }

    /// A line cut short, by a crash before this process or by another writer while it runs,
    /// loses only itself: the entries after it stay whole and readable.
    #[test]
    fn a_cut_last_line_costs_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        std::fs::write(
            &path,
            "{\"at\":\"2026-12-06\",\"route\":\"shop\",\"event\":\"tra",
        )
        .unwrap();
        let journal = Journal::new(dir.path());
        journal.append(&entry("a")).unwrap();
        let mut other = OpenOptions::new().append(true).open(&path).unwrap();
        other.write_all(b"{\"cut").unwrap();
        journal.append(&entry("b")).unwrap();
        journal.append(&entry("c")).unwrap();
        let reasons = reasons(&journal);
        assert_eq!(reasons, ["c", "b", "a"]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    /// Lines that are not entries (cut inside a character, not UTF-8, not an object) are left
    /// out of the tail; they never make the journal unreadable.
    #[test]
    fn lines_that_are_not_entries_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        journal.append(&entry("a")).unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        // "é" cut after its first byte, then a line that is JSON but no entry.
        file.write_all(b"{\"reason\":\"\xc3\n42\n\xff\xfe\n")
            .unwrap();
        journal.append(&entry("b")).unwrap();
        let reasons = reasons(&journal);
        assert_eq!(reasons, ["b", "a"]);
    }
}
