//! Watches the config file's directory (so that write-to-temp-then-rename and Kubernetes
//! ConfigMap symlink swaps are seen) and the file itself (so that writes reaching it by another
//! path are seen: a file bind-mounted into a container, a hard link), debounces bursts, and
//! reloads when the content changed. A rejected file keeps the old config serving (see
//! `App::reload`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
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
        if event.is_ok_and(|event| may_change(&event.kind)) {
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
    // The directory's watch sees only what is done through this directory. The file's own watch
    // follows its inode (a later rename is seen by the directory's watch).
    if let Err(error) = watcher.watch(&path, RecursiveMode::NonRecursive) {
        debug!(path = %path.display(), %error, "Cannot watch the config file itself.");
    }
    Some(Watching {
        last: content_hash(&path),
        path,
        rx,
        _watcher: watcher,
    })
}

/// Whether a file event can mean new content. Reads (opening, closing without writing) cannot,
/// and reloading reads the file: waking on them would read it again and again.
fn may_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const QUIET: Duration = Duration::from_millis(400);
    const SOON: Duration = Duration::from_secs(5);

    #[test]
    fn only_events_that_can_change_content_wake() {
        use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};
        let wakes = [
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Any,
        ];
        for kind in wakes {
            assert!(may_change(&kind), "{kind:?} must wake the watcher");
        }
        let reads = [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Read),
        ];
        for kind in reads {
            assert!(!may_change(&kind), "{kind:?} must not wake the watcher");
        }
    }

    /// Wake-ups arriving within `within`, counting each burst once.
    async fn woken(watching: &mut Watching, within: Duration) -> bool {
        let woke = tokio::time::timeout(within, watching.rx.recv())
            .await
            .is_ok();
        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, watching.rx.recv()).await {}
        woke
    }

    #[tokio::test]
    async fn reading_the_file_does_not_wake_the_watcher_and_writing_does() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("veer.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        let mut watching = watch(path.clone()).expect("watch");
        for _ in 0..3 {
            std::fs::read(&path).expect("read");
        }
        assert!(!woken(&mut watching, QUIET).await, "reads woke the watcher");
        std::fs::write(&path, "a = 2\n").expect("write");
        assert!(
            woken(&mut watching, SOON).await,
            "a write did not wake the watcher"
        );
    }

    /// A file bind-mounted into a container is written through another directory; a hard link
    /// is the same situation without a container.
    #[tokio::test]
    async fn a_write_through_another_path_to_the_same_file_wakes_the_watcher() {
        let watched = tempfile::tempdir().expect("temp dir");
        let elsewhere = tempfile::tempdir().expect("temp dir");
        let path = watched.path().join("veer.toml");
        let link = elsewhere.path().join("veer.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        std::fs::hard_link(&path, &link).expect("hard link");
        let mut watching = watch(path.clone()).expect("watch");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&link)
            .expect("open the link");
        file.write_all(b"a = 2\n").expect("write through the link");
        drop(file);
        assert!(woken(&mut watching, SOON).await, "the write was not seen");
        assert_eq!(content_hash(&path), Some(xxh3_64(b"a = 2\n")));
    }
}
