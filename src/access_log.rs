//! The access log: one JSON line per request, written by a background thread so that a slow
//! disk never stalls a request. The queue is bounded; what it cannot take is counted.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::AccessLog;
use crate::Slot;

const QUEUE: usize = 8192;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Record {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// `null` for a request veer answered before it had a route (404, 400).
    pub route: Option<String>,
    pub slot: Option<&'static str>,
    pub bucket: Option<u32>,
    pub method: String,
    pub path: String,
    pub status: u16,
    #[serde(serialize_with = "to_microsecond")]
    pub upstream_ms: f64,
    #[serde(serialize_with = "to_microsecond")]
    pub total_ms: f64,
    pub bytes: u64,
    pub shadowed: bool,
}

impl Record {
    /// A record stamped now, to be completed with the answer.
    pub fn new(route: Option<&str>, slot: Option<(Slot, u32)>, method: &str, path: &str) -> Self {
        Record {
            time: SystemTime::now(),
            route: route.map(str::to_string),
            slot: slot.map(|(slot, _)| slot.as_str()),
            bucket: slot.map(|(_, bucket)| bucket),
            method: method.to_string(),
            path: path.to_string(),
            status: 0,
            upstream_ms: 0.0,
            total_ms: 0.0,
            bytes: 0,
            shadowed: false,
        }
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

/// Milliseconds to three decimals: `0.771`, not `0.7712110000000001`.
fn to_microsecond<S: serde::Serializer>(ms: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((ms * 1000.0).round() / 1000.0)
}

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("server.access_log: cannot open {path:?}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the access log writer: {0}")]
    Thread(std::io::Error),
}

/// A handle to the writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLogger {
    tx: SyncSender<Record>,
    pub dropped: Arc<AtomicU64>,
    /// Set by [`AccessLogger::reopen`]; the writer reopens the file before its next lines.
    reopen: Arc<AtomicBool>,
}

impl AccessLogger {
    /// Starts the writer thread, or returns `None` when the log is off.
    pub fn start(config: &AccessLog) -> Result<Option<AccessLogger>, AccessLogError> {
        let (out, path): (Box<dyn Write + Send>, _) = match config {
            AccessLog::Off => return Ok(None),
            AccessLog::Stderr => (Box::new(std::io::stderr()), None),
            AccessLog::File(path) => (Box::new(open(path)?), Some(path.clone())),
        };
        let (tx, rx) = sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let asked = Arc::clone(&reopen);
        std::thread::Builder::new()
            .name("veer-access-log".into())
            .spawn(move || write_loop(rx, out, path, &asked))
            .map_err(AccessLogError::Thread)?;
        Ok(Some(AccessLogger {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            reopen,
        }))
    }

    /// Has the writer open the file anew (at the same path) before its next lines: after a
    /// log rotation moved or removed it. Every reload asks for it (`SIGHUP` included).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Queues a record without waiting; counts it as dropped when the queue is full.
    pub fn log(&self, record: Record) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(record)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn open(path: &PathBuf) -> Result<std::fs::File, AccessLogError> {
    let file = OpenOptions::new().create(true).append(true).open(path);
    file.map_err(|source| AccessLogError::Open {
        path: path.clone(),
        source,
    })
}

fn write_loop(
    rx: Receiver<Record>,
    mut out: Box<dyn Write + Send>,
    path: Option<PathBuf>,
    reopen: &AtomicBool,
) {
    // Whole lines only reach `out`, each batch in one `write_all`: on stderr that is one hold
    // of its lock, so the log's other lines fall between access lines, never inside one (a
    // `BufWriter` flushes at its capacity, mid-line).
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    while let Ok(record) = rx.recv() {
        if let Some(path) = path
            .as_ref()
            .filter(|_| reopen.swap(false, Ordering::Relaxed))
        {
            match open(path) {
                Ok(file) => out = Box::new(file),
                Err(error) => tracing::warn!(%error, "Cannot reopen the access log; writing on."),
            }
        }
        let mut result = Ok(());
        let mut next = Some(record);
        while let Some(record) = next {
            let start = batch.len();
            match serde_json::to_writer(&mut batch, &record) {
                Ok(()) => batch.push(b'\n'),
                Err(_) => batch.truncate(start),
            }
            if batch.len() >= BATCH_BYTES {
                result = result.and(out.write_all(&batch));
                batch.clear();
            }
            next = rx.try_recv().ok();
        }
        result = result.and(out.write_all(&batch)).and_then(|()| out.flush());
        batch.clear();
        if let Err(error) = result {
            tracing::warn!(%error, "Cannot write the access log.");
        }
    }
}

/// The most bytes of access lines gathered before they are written.
const BATCH_BYTES: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until `path` holds at least `lines` lines; its text.
    fn lines_in(path: &std::path::Path, lines: usize) -> String {
        let mut text = String::new();
        for _ in 0..500 {
            text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= lines {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        text
    }

    /// What a writer was handed, call by call.
    #[derive(Clone, Default)]
    struct Calls(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every write hands over whole lines (on stderr, other log lines cannot then fall inside
    /// an access line): 5,000 records of about 150 bytes, queued at once, so that batches
    /// fill past their limit.
    #[test]
    fn writes_hand_over_whole_lines() {
        let (tx, rx) = std::sync::mpsc::sync_channel(10_000);
        for i in 0..5_000 {
            tx.send(Record::new(None, None, "GET", &format!("/path/{i}")))
                .unwrap();
        }
        drop(tx);
        let calls = Calls::default();
        write_loop(rx, Box::new(calls.clone()), None, &AtomicBool::new(false));
        let calls = calls.0.lock().unwrap();
        assert!(calls.len() > 1, "{} writes", calls.len());
        assert!(calls.iter().all(|call| call.last() == Some(&b'\n')));
        let lines: usize = calls
            .iter()
            .map(|c| c.iter().filter(|&&b| b == b'\n').count())
            .sum();
        assert_eq!(lines, 5_000);
    }

    #[test]
    fn a_rotated_log_is_reopened_at_its_path_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let logger = AccessLogger::start(&AccessLog::File(path.clone()))
            .unwrap()
            .unwrap();
        logger.log(Record::new(None, None, "GET", "/before"));
        assert_eq!(lines_in(&path, 1).lines().count(), 1);
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        logger.reopen();
        logger.log(Record::new(None, None, "GET", "/after"));
        let text = lines_in(&path, 1);
        assert!(text.contains("/after"), "{text:?}");
        assert!(!text.contains("/before"), "{text:?}");
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
    }

    #[test]
    fn records_reach_the_file_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let logger = AccessLogger::start(&AccessLog::File(path.clone()))
            .unwrap()
            .unwrap();
        let mut record = Record::new(Some("shop"), Some((Slot::Green, 42)), "GET", "/a");
        record.status = 200;
        record.upstream_ms = 12.3456789;
        record.total_ms = 0.7712110000000001;
        logger.log(record);
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["route"], "shop");
        assert_eq!(line["slot"], "green");
        assert_eq!(line["status"], 200);
        // Times to the microsecond, written as such.
        assert!(
            text.contains(r#""upstream_ms":12.346,"total_ms":0.771,"#),
            "{text}"
        );
        assert_eq!(logger.dropped.load(Ordering::Relaxed), 0);
    }
}
