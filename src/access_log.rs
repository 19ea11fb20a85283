//! The access log: one JSON line per request, written by a background thread so that a slow
//! disk never stalls a request. The queue is bounded; what it cannot take is counted.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::AccessLog;

const QUEUE: usize = 8192;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Record {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub route: String,
    pub slot: &'static str,
    pub bucket: u32,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub upstream_ms: f64,
    pub total_ms: f64,
    pub bytes: u64,
    pub shadowed: bool,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

/// A handle to the writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLogger {
    tx: SyncSender<Record>,
    pub dropped: Arc<AtomicU64>,
}

impl AccessLogger {
    /// Starts the writer thread, or returns `None` when the log is off.
    pub fn start(config: &AccessLog) -> std::io::Result<Option<AccessLogger>> {
        let out: Box<dyn Write + Send> = match config {
            AccessLog::Off => return Ok(None),
            AccessLog::Stderr => Box::new(std::io::stderr()),
            AccessLog::File(path) => {
                Box::new(OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("veer-access-log".into())
            .spawn(move || write_loop(rx, out))?;
        Ok(Some(AccessLogger {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }))
    }

    /// Queues a record without waiting; counts it as dropped when the queue is full.
    pub fn log(&self, record: Record) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(record)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_loop(rx: Receiver<Record>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::new(out);
    while let Ok(record) = rx.recv() {
        let mut write = |record: &Record| -> std::io::Result<()> {
            serde_json::to_writer(&mut out, record)?;
            out.write_all(b"\n")
        };
        let mut result = write(&record);
        while let Ok(record) = rx.try_recv() {
            result = result.and(write(&record));
        }
        if let Err(error) = result.and_then(|()| out.flush()) {
            tracing::warn!(%error, "Cannot write the access log.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_the_file_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let logger = AccessLogger::start(&AccessLog::File(path.clone()))
            .unwrap()
            .unwrap();
        logger.log(Record {
            time: SystemTime::now(),
            route: "shop".into(),
            slot: "green",
            bucket: 42,
            method: "GET".into(),
            path: "/a".into(),
            status: 200,
            upstream_ms: 1.5,
            total_ms: 2.0,
            bytes: 10,
            shadowed: false,
        });
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
        assert_eq!(logger.dropped.load(Ordering::Relaxed), 0);
    }
}
