//! Watches the config file's directory (so that write-to-temp-then-rename and Kubernetes
//! ConfigMap symlink swaps are seen), debounces bursts, and reloads when the content changed.
//! A rejected file keeps the old config serving (see `App::reload`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use xxhash_rust::xxh3::xxh3_64;

use crate::app::App;

/// How long a burst of file events must be quiet before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

fn content_hash(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|bytes| xxh3_64(&bytes))
}

/// Runs until the process ends.
pub async fn run(path: PathBuf, app: Arc<App>) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // A full channel already holds a wake-up: dropping this one loses nothing.
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            warn!(%error, "Cannot watch the config file; reload with SIGHUP or the admin API.");
            return;
        }
    };
    if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), %error, "Cannot watch the config directory; reload with SIGHUP or the admin API.");
        return;
    }
    let mut last = content_hash(&path);
    while rx.recv().await.is_some() {
        // Debounce: wait until events stop for DEBOUNCE.
        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
        let now = content_hash(&path);
        if now.is_none() || now == last {
            continue;
        }
        debug!(path = %path.display(), "Config file changed.");
        last = now;
        let _ = app.reload().await;
    }
}
