//! The decision journal: one JSON line per transition or analysis that changed something,
//! appended to `state.dir/journal.jsonl` with the numbers behind it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
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

    /// The open file, reopened (created anew) when the path no longer names it: the journal
    /// was rotated (moved aside, as logrotate does) or deleted while veer ran. Kept open
    /// instead, every later entry would go to the old file, or to none that has a name.
    fn opened(&self) -> std::io::Result<MutexGuard<'_, Option<File>>> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("journal lock poisoned"))?;
        if guard
            .as_ref()
            .is_some_and(|file| !crate::io::names(&self.path, file))
        {
            tracing::info!(path = %self.path.display(), "The journal was moved or deleted; a new one is started.");
            *guard = None;
        }
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

    /// The newest `limit` entries, newest first: the file is read backwards a chunk at a time
    /// until `limit` entries are found or its start is reached.
    pub fn tail(&self, limit: usize) -> std::io::Result<Vec<serde_json::Value>> {
        const CHUNK: u64 = 64 << 10;
        // A line longer than this is none of veer's (a decision is a few KB): skipped.
        const MAX_LINE: usize = 1 << 20;
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error),
        };
        let mut end = file.metadata()?.len();
        let mut entries = Vec::new();
        // The end of the line that began before the bytes read so far.
        let mut rest: Vec<u8> = Vec::new();
        while end > 0 && entries.len() < limit {
            let start = end.saturating_sub(CHUNK);
            let mut bytes = vec![0; (end - start) as usize];
            file.read_exact_at(&mut bytes, start)?;
            bytes.append(&mut rest);
            // Up to the first newline: the end of a line begun further back (none at the
            // file's start). Bytes, not text: a line cut inside a character (a crash
            // mid-write) must cost only itself, not every read of the journal.
            let head = (start > 0).then(|| memchr::memchr(b'\n', &bytes).unwrap_or(bytes.len()));
            let whole = head.map_or(0, |head| (head + 1).min(bytes.len()));
            let lines = bytes[whole..].split(|&b| b == b'\n').rev();
            entries.extend(
                lines
                    .filter_map(|line| serde_json::from_slice(line).ok())
                    .filter(serde_json::Value::is_object)
                    .take(limit - entries.len()),
            );
            bytes.truncate(head.unwrap_or(0));
            if bytes.len() <= MAX_LINE {
                rest = bytes;
            }
            end = start;
        }
        Ok(entries)
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

    /// A journal moved aside (rotated) or deleted while veer runs is started anew at its path:
    /// the entries after it are written there and read back by the tail.
    #[test]
    fn a_rotated_or_deleted_journal_is_started_anew() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let path = dir.path().join("journal.jsonl");
        journal.append(&entry("a")).unwrap();
        std::fs::rename(&path, dir.path().join("journal.jsonl.1")).unwrap();
        journal.append(&entry("b")).unwrap();
        assert_eq!(reasons(&journal), ["b"]);
        let rotated = std::fs::read_to_string(dir.path().join("journal.jsonl.1")).unwrap();
        assert_eq!(rotated.lines().count(), 1, "{rotated}");
        std::fs::remove_file(&path).unwrap();
        journal.append(&entry("c")).unwrap();
        journal.append(&entry("d")).unwrap();
        assert_eq!(reasons(&journal), ["d", "c"]);
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

    /// A long journal is read back as far as `limit` asks: 6,000 entries of ~1.2 KB each
    /// (7 MB, over a hundred of the reader's chunks, lines cut at every chunk's edge) come
    /// back whole and in order, past a line longer than any entry, which is left out.
    #[test]
    fn the_tail_reads_as_far_back_as_the_limit_asks() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        let pad = "x".repeat(1_100);
        let reason = |n: usize| format!("{n} {pad}");
        for n in 0..3_000 {
            journal.append(&entry(&reason(n))).unwrap();
        }
        let path = dir.path().join("journal.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        let long = format!("{{\"reason\":\"{}\"}}\n", "y".repeat(3 << 20));
        file.write_all(long.as_bytes()).unwrap();
        for n in 3_000..6_000 {
            journal.append(&entry(&reason(n))).unwrap();
        }
        let numbers = |limit| -> Vec<usize> {
            let tail = journal.tail(limit).unwrap();
            let number = |e: &serde_json::Value| {
                let reason = e["reason"].as_str().unwrap();
                reason.split(' ').next().unwrap().parse().unwrap()
            };
            tail.iter().map(number).collect()
        };
        assert_eq!(numbers(5_000), (1_000..6_000).rev().collect::<Vec<_>>());
        assert_eq!(numbers(10_000), (0..6_000).rev().collect::<Vec<_>>());
        assert_eq!(numbers(1), [5_999]);
    }
}
