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

/// A watch on the config file's directory, started by [`watch`]; [`Watching::run`] reloads.
pub struct Watching {
    path: PathBuf,
    /// Content hash of the file when the watch started.
    last: Option<u64>,
    rx: mpsc::Receiver<()>,
    /// Events stop when the watcher is dropped.
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching at once, so that no change made after this call is missed however late the
/// reloading task first runs. `None` (logged) when the file cannot be watched; SIGHUP and the
/// admin API still reload.
pub fn watch(path: PathBuf) -> Option<Watching> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, rx) = mpsc::channel::<()>(16);
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
            return None;
        }
    };
    if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), %error, "Cannot watch the config directory; reload with SIGHUP or the admin API.");
        return None;
    }
    Some(Watching {
        last: content_hash(&path),
        path,
        rx,
        _watcher: watcher,
    })
}

impl Watching {
    /// Reloads whenever the file's content changed, until the process ends.
    pub async fn run(mut self, app: Arc<App>) {
        while self.rx.recv().await.is_some() {
            // Debounce: wait until events stop for DEBOUNCE.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, self.rx.recv()).await {}
            let now = content_hash(&self.path);
            if now.is_none() || now == self.last {
                continue;
            }
            debug!(path = %self.path.display(), "Config file changed.");
            self.last = now;
            let _ = app.reload().await;
        }
    }
}
