//! Watches the config file's directory (so that write-to-temp-then-rename and Kubernetes
//! ConfigMap symlink swaps are seen) and the file itself (so that writes reaching it by another
//! path are seen: a file bind-mounted into a container, a hard link), debounces bursts, and
//! reloads when the content changed. Writes to other files in the directory (a log next to the
//! config) are ignored, so they can neither delay a reload nor cause reads. A rejected file keeps the old config serving (see
//! `App::reload`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};
use xxhash_rust::xxh3::xxh3_64;

use crate::app::App;

/// How long a burst of file events must be quiet before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest a burst can put a reload off: events that never stop still get one this often.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

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
    let name = path.file_name().map(OsString::from).unwrap_or_default();
    let (tx, rx) = mpsc::channel::<()>(16);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| may_change(&event, &name)) {
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

/// Whether a file event can mean new content for the config file called `name`. Reads
/// (opening, closing without writing) cannot, and reloading reads the file: waking on them would
/// read it again and again. Writes count when they are to the file itself; a creation, removal or
/// rename counts whatever its name (an editor's save, a Kubernetes ConfigMap's `..data` swap).
fn may_change(event: &notify::Event, name: &OsString) -> bool {
    let names_the_file = || {
        event
            .paths
            .iter()
            .any(|path| path.file_name() == Some(name.as_os_str()))
    };
    match event.kind {
        EventKind::Modify(ModifyKind::Name(_)) => true,
        EventKind::Modify(_) | EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            names_the_file()
        }
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl Watching {
    /// Reloads whenever the file's content changed, until the process ends.
    pub async fn run(mut self, app: Arc<App>) {
        while self.settled().await {
            let now = content_hash(&self.path);
            if now.is_none() || now == self.last {
                continue;
            }
            debug!(path = %self.path.display(), "Config file changed.");
            self.last = now;
            let _ = app.reload().await;
        }
    }

    /// Waits for a burst of events to settle: quiet for [`DEBOUNCE`], or [`MAX_DELAY`] after its
    /// first event. `false` once the watcher is gone.
    async fn settled(&mut self) -> bool {
        if self.rx.recv().await.is_none() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        let quiet = async {
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, self.rx.recv()).await {}
        };
        let _ = tokio::time::timeout_at(deadline, quiet).await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const QUIET: Duration = Duration::from_millis(400);
    const SOON: Duration = Duration::from_secs(5);

    #[test]
    fn only_events_that_can_change_the_file_wake() {
        use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};
        use notify::Event;
        let name = OsString::from("veer.toml");
        let event = |kind, path: &str| Event::new(kind).add_path(PathBuf::from(path));
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let wakes = [
            event(write, "/etc/veer/veer.toml"),
            event(closed, "/etc/veer/veer.toml"),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/etc/veer/veer.toml",
            ),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/etc/veer/..data",
            ),
            event(EventKind::Create(CreateKind::File), "/etc/veer/..data_tmp"),
            event(EventKind::Remove(RemoveKind::File), "/etc/veer/veer.toml"),
            event(EventKind::Any, "/etc/veer/other"),
        ];
        for event in wakes {
            assert!(may_change(&event, &name), "{event:?} must wake the watcher");
        }
        let ignored = [
            event(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/etc/veer/veer.toml",
            ),
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                "/etc/veer/veer.toml",
            ),
            event(write, "/etc/veer/access.log"),
            event(closed, "/etc/veer/access.log"),
        ];
        for event in ignored {
            assert!(
                !may_change(&event, &name),
                "{event:?} must not wake the watcher"
            );
        }
    }

    /// A config file `veer.toml` in a new directory, and a watch on it.
    fn watched() -> (tempfile::TempDir, PathBuf, Watching) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("veer.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        let watching = watch(path.clone()).expect("watch");
        (dir, path, watching)
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
        let (_dir, path, mut watching) = watched();
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

    #[tokio::test]
    async fn writes_to_other_files_in_the_directory_do_not_wake_the_watcher() {
        let (dir, _path, mut watching) = watched();
        let mut log = std::fs::File::create(dir.path().join("access.log")).expect("create");
        // The creation of the log is a directory change: let it pass.
        woken(&mut watching, QUIET).await;
        for _ in 0..5 {
            log.write_all(b"a line\n").expect("append");
        }
        drop(log);
        assert!(
            !woken(&mut watching, QUIET).await,
            "appends to a log woke the watcher"
        );
    }

    /// Changes that never stop (files created every 50 ms for 4 s) put a reload off by at most
    /// MAX_DELAY.
    #[tokio::test]
    async fn a_burst_that_never_stops_delays_a_reload_by_at_most_max_delay() {
        let (dir, _path, mut watching) = watched();
        let churn = dir.path().to_path_buf();
        let churning = tokio::spawn(async move {
            for i in 0..80 {
                let _ = std::fs::write(churn.join(format!("tmp{i}")), b"x");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = tokio::time::Instant::now();
        assert!(watching.settled().await);
        let waited = started.elapsed();
        churning.abort();
        assert!(
            waited < MAX_DELAY + Duration::from_secs(1),
            "settled after {waited:?} under constant changes"
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
