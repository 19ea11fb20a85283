//! Watches what can change the config: the config file and the files it names (the TLS
//! certificate and key, so that a renewed certificate is served without a SIGHUP). For each, its
//! directory (so that write-to-temp-then-rename and Kubernetes ConfigMap or Secret symlink swaps
//! are seen), the directory of every symlink on the way to it and of the file it resolves to (a
//! re-pointed link such as certbot's `live/` ones, a swapped `current -> release-7` directory),
//! the directory above its own (which may be deleted and made anew), and the file itself (so that
//! writes reaching it by another path are seen: a file bind-mounted into a container, a hard
//! link). It debounces bursts, reloads when the content of any of them changed, and after each
//! burst places its watches again, as links may point elsewhere now. Writes to other files in
//! those directories (a log next to the config) are ignored, so they can neither delay a reload
//! nor cause reads. A rejected config keeps the old one serving (see `App::reload`); a config
//! that cannot be read (deleted, its permissions taken) is reloaded once, to be rejected where
//! operators look. Reloads by SIGHUP or the admin API are noticed: the content they read is
//! not the one this watcher last applied.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
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
/// How long a config read as invalid waits for more writing before it is reloaded (and
/// rejected): a file saved in place (truncated, then written) and read in between is empty, or
/// cut short.
pub const SAVE_GAP: Duration = Duration::from_millis(500);
/// The most symlinks followed on the way to the file, as the kernel does (`ELOOP`).
const MAX_LINKS: usize = 40;

fn content_hash(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|bytes| xxh3_64(&bytes))
}

/// One hash of the content of every file, `None` when the first (the config) cannot be read. A
/// named file that cannot be read counts as content of its own: the reload will say why.
fn contents_hash(files: &[PathBuf]) -> Option<u64> {
    let (config, named) = files.split_first()?;
    let mut hashes = vec![content_hash(config)?];
    hashes.extend(named.iter().map(|file| content_hash(file).unwrap_or(0)));
    let bytes: Vec<u8> = hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
    Some(xxh3_64(&bytes))
}

/// What can change the content read at the watched paths, found by [`Targets::of`].
#[derive(Default)]
struct Targets {
    /// Directories in which any entry made, removed or renamed may change it: each path's own,
    /// and, following the first symlink from the root each time, the directory of that link
    /// and of the path it leads to, until a path without links.
    dirs: BTreeSet<PathBuf>,
    /// The directory above each path's own, where only that directory itself counts: (above,
    /// own).
    above: BTreeSet<(PathBuf, PathBuf)>,
    /// The names the files are written under: their own, and those of the links and files they
    /// resolve through.
    names: BTreeSet<OsString>,
}

impl Targets {
    fn of(paths: &[PathBuf]) -> Targets {
        let mut targets = Targets::default();
        for path in paths {
            targets.add(path);
        }
        targets
    }

    fn add(&mut self, path: &Path) {
        let targets = self;
        if let Some((above, own)) = path
            .parent()
            .and_then(|own| Some((own.parent()?.to_path_buf(), own.to_path_buf())))
        {
            targets.above.insert((above, own));
        }
        let mut next = Some(path.to_path_buf());
        for _ in 0..MAX_LINKS {
            let Some(path) = next.take() else { break };
            if let Some(dir) = path.parent() {
                targets.dirs.insert(dir.to_path_buf());
            }
            if let Some(name) = path.file_name() {
                targets.names.insert(name.to_owned());
            }
            let mut ancestors: Vec<&Path> = path.ancestors().collect();
            ancestors.reverse();
            let link = ancestors.into_iter().find(|a| {
                a.symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
            });
            let Some(link) = link else { break };
            if let (Some(dir), Ok(target)) = (link.parent(), std::fs::read_link(link)) {
                targets.dirs.insert(dir.to_path_buf());
                let mut led_to = dir.join(target);
                if let Ok(rest) = path.strip_prefix(link) {
                    if !rest.as_os_str().is_empty() {
                        led_to.push(rest);
                    }
                }
                next = Some(led_to);
            }
        }
    }

    /// Every directory to watch.
    fn watched(&self) -> impl Iterator<Item = &PathBuf> {
        self.dirs
            .iter()
            .chain(self.above.iter().map(|(above, _)| above))
    }

    /// Whether a file event can mean new content for the config file. Reads (opening, closing
    /// without writing) cannot, and reloading reads the file: waking on them would read it again
    /// and again. Writes count when they are to the file; a creation, removal or rename counts
    /// whatever its name in the directories on the way to the file (an editor's save, a
    /// Kubernetes ConfigMap's `..data` swap), and above them only for the file's own directory.
    fn may_change(&self, event: &notify::Event) -> bool {
        let in_dirs = |path: &PathBuf| path.parent().is_some_and(|dir| self.dirs.contains(dir));
        let is_the_file = |path: &PathBuf| {
            in_dirs(path)
                && path
                    .file_name()
                    .is_some_and(|name| self.names.contains(name))
        };
        let around =
            |path: &PathBuf| in_dirs(path) || self.above.iter().any(|(_, own)| path == own);
        // An event with no path (the kernel's queue overflowed) may hide anything.
        let any = |test: &dyn Fn(&PathBuf) -> bool| {
            event.paths.is_empty() || event.paths.iter().any(test)
        };
        match event.kind {
            EventKind::Modify(ModifyKind::Name(_)) => any(&around),
            EventKind::Modify(_) | EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                any(&is_the_file)
            }
            EventKind::Access(_) => false,
            _ => any(&around),
        }
    }
}

/// A watch on what can change the config, started by [`watch`]; [`Watching::run`] reloads.
pub struct Watching {
    /// The config's path, then the files the config in force names, made absolute (the watcher
    /// names events by absolute paths).
    files: Vec<PathBuf>,
    /// Content hash of the files last applied (`None` after a rejection: the same content is
    /// tried again at the next change around them).
    last: Option<u64>,
    rx: mpsc::Receiver<()>,
    /// Events stop when the watcher is dropped.
    watcher: notify::RecommendedWatcher,
    /// What is watched now; the event filter reads it too.
    targets: Arc<Mutex<Targets>>,
}

fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// Starts watching the config at `path` and the files it names (`named`) at once, so that no
/// change made after this call is missed however late the reloading task first runs. `None`
/// (logged) when the config's directory cannot be watched; SIGHUP and the admin API still
/// reload.
pub fn watch(path: PathBuf, named: Vec<PathBuf>) -> Option<Watching> {
    let files: Vec<PathBuf> = std::iter::once(path).chain(named).map(absolute).collect();
    let targets = Arc::new(Mutex::new(Targets::default()));
    let (tx, rx) = mpsc::channel::<()>(16);
    let filter = Arc::clone(&targets);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let targets = filter.lock().unwrap_or_else(PoisonError::into_inner);
        if event.is_ok_and(|event| targets.may_change(&event)) {
            // A full channel already holds a wake-up: dropping this one loses nothing.
            let _ = tx.try_send(());
        }
    });
    let watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            warn!(%error, "Cannot watch the config file; reload with SIGHUP or the admin API.");
            return None;
        }
    };
    let mut watching = Watching {
        last: contents_hash(&files),
        files,
        rx,
        watcher,
        targets,
    };
    if let Err(error) = watching.place() {
        warn!(path = %watching.files[0].display(), %error, "Cannot watch the config directory; reload with SIGHUP or the admin API.");
        return None;
    }
    Some(watching)
}

impl Watching {
    /// Places the watches for where the paths lead now. Directories already watched are
    /// watched again: one deleted and made anew is another directory to the kernel. An error
    /// when the config file's own directory cannot be watched.
    fn place(&mut self) -> notify::Result<()> {
        let next = Targets::of(&self.files);
        // Not held while watching: the watcher waits on its event thread, which may be waiting
        // on this lock to filter an event.
        let before: Vec<PathBuf> = {
            let targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
            targets.watched().cloned().collect()
        };
        let kept: BTreeSet<&PathBuf> = next.watched().collect();
        for gone in before.iter().filter(|dir| !kept.contains(dir)) {
            let _ = self.watcher.unwatch(gone);
        }
        let own = self.files[0].parent();
        let mut result = Ok(());
        for dir in next.watched() {
            if let Err(error) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                debug!(dir = %dir.display(), %error, "Cannot watch a directory of the config.");
                if Some(dir.as_path()) == own {
                    result = Err(error);
                }
            }
        }
        // The directories' watches see only what is done through them. A file's own watch
        // follows its inode (which a rename replaces: so it is placed again too).
        for file in &self.files {
            if let Err(error) = self.watcher.watch(file, RecursiveMode::NonRecursive) {
                debug!(path = %file.display(), %error, "Cannot watch a file of the config itself.");
            }
        }
        *self.targets.lock().unwrap_or_else(PoisonError::into_inner) = next;
        result
    }

    /// Reloads whenever the content of the config or of a file it names changed, until the
    /// process ends.
    pub async fn run(self, app: Arc<App>) {
        let reloading = Arc::clone(&app);
        let reload = move || {
            let app = Arc::clone(&reloading);
            async move {
                let (result, done) = app.reload_counted().await;
                (result.ok().map(|()| app.named_files()), done)
            }
        };
        let valid = |path: &Path| {
            crate::config::Config::load_for(path, crate::config::Purpose::Reload).is_ok()
        };
        self.run_with(reload, move || app.reloads_done(), valid)
            .await;
    }

    /// [`Watching::run`] with `reload` (`Some` with the files the config names when it was
    /// applied, and how many reloads were done when it ended), `reloads_done` (how many
    /// reloads were done so far, by any path) and `valid` (whether the config at a path is).
    async fn run_with<R: Future<Output = (Option<Vec<PathBuf>>, u64)>>(
        mut self,
        mut reload: impl FnMut() -> R,
        reloads_done: impl Fn() -> u64,
        valid: impl Fn(&Path) -> bool,
    ) {
        // The reloads done when this watcher last reloaded: one done since by SIGHUP or the
        // admin API read the file as it was then, so the hash kept here no longer tells what
        // is in force (a file changed, reloaded by SIGHUP, then changed back).
        let mut seen = reloads_done();
        // Whether the config could not be read at the last reload: a file deleted or made
        // unreadable is reloaded once, so that the rejection is told (logged, counted, shown by
        // the admin API), not at every event until it can be read again.
        let mut unreadable = false;
        while self.settled().await {
            // A save in place read between its truncation and its writing is empty or cut
            // short: a config read as invalid is read again once the writing that follows it
            // within `SAVE_GAP` has settled (once: a file that stays invalid under writes that
            // never stop is still rejected within a few seconds).
            if !valid(&self.files[0]) && self.stirs().await {
                self.quiet().await;
            }
            // What changed may be a link or a directory on the way to a file.
            let _ = self.place();
            let now = contents_hash(&self.files);
            let unchanged = match now {
                None => unreadable,
                Some(_) => now == self.last,
            };
            if unchanged && reloads_done() == seen {
                continue;
            }
            debug!(path = %self.files[0].display(), "Config changed.");
            unreadable = now.is_none();
            // A rejected config is read again at the next change around it: it may have been
            // refused for a file it names (a certificate) that is there now.
            let (applied, done) = reload().await;
            self.last = match applied {
                None => None,
                Some(named) if self.follows(&named) => now,
                // Other files named: the hash of what is watched from now on.
                Some(named) => self.follow(named),
            };
            // As the reload ended: one by SIGHUP right after it is one more.
            seen = done;
        }
    }

    /// Whether these are the files watched besides the config.
    fn follows(&self, named: &[PathBuf]) -> bool {
        named.len() + 1 == self.files.len()
            && named
                .iter()
                .zip(&self.files[1..])
                .all(|(n, f)| absolute(n.clone()) == *f)
    }

    /// Watches the other files an applied config names from now on; the hash of them all.
    fn follow(&mut self, named: Vec<PathBuf>) -> Option<u64> {
        let named: Vec<PathBuf> = named.into_iter().map(absolute).collect();
        for gone in self.files[1..].iter().filter(|f| !named.contains(f)) {
            let _ = self.watcher.unwatch(gone);
        }
        self.files.truncate(1);
        self.files.extend(named);
        let _ = self.place();
        contents_hash(&self.files)
    }

    /// Waits for a burst of events to settle: quiet for [`DEBOUNCE`], or [`MAX_DELAY`] after its
    /// first event. `false` once the watcher is gone.
    async fn settled(&mut self) -> bool {
        if self.rx.recv().await.is_none() {
            return false;
        }
        self.quiet().await;
        true
    }

    /// The rest of a burst whose first event was taken: until quiet for [`DEBOUNCE`], or
    /// [`MAX_DELAY`] from now.
    async fn quiet(&mut self) {
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        let quiet = async {
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, self.rx.recv()).await {}
        };
        let _ = tokio::time::timeout_at(deadline, quiet).await;
    }

    /// Whether an event comes within [`SAVE_GAP`].
    async fn stirs(&mut self) -> bool {
        matches!(
            tokio::time::timeout(SAVE_GAP, self.rx.recv()).await,
            Ok(Some(()))
        )
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
        // /etc/veer/veer.toml, not a link.
        let targets = Targets {
            dirs: BTreeSet::from([PathBuf::from("/etc/veer")]),
            above: BTreeSet::from([(PathBuf::from("/etc"), PathBuf::from("/etc/veer"))]),
            names: BTreeSet::from([OsString::from("veer.toml")]),
        };
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
            event(EventKind::Create(CreateKind::Folder), "/etc/veer"),
            event(EventKind::Remove(RemoveKind::Folder), "/etc/veer"),
            Event::new(EventKind::Other),
        ];
        for event in wakes {
            assert!(
                targets.may_change(&event),
                "{event:?} must wake the watcher"
            );
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
            event(EventKind::Create(CreateKind::File), "/etc/hosts.new"),
            event(write, "/etc/veer.toml"),
            event(write, "/srv/veer.toml"),
        ];
        for event in ignored {
            assert!(
                !targets.may_change(&event),
                "{event:?} must not wake the watcher"
            );
        }
    }

    /// A config file `veer.toml` in a new directory, and a watch on it.
    fn watched() -> (tempfile::TempDir, PathBuf, Watching) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("veer.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        let watching = watch(path.clone(), Vec::new()).expect("watch");
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
        let mut watching = watch(path.clone(), Vec::new()).expect("watch");
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

    /// A watch on `path` (a config naming `named`) run with a reload that reports the content
    /// of `path` it read and answers `accept`.
    fn reloading_named(
        path: &Path,
        named: Vec<PathBuf>,
        accept: Arc<std::sync::atomic::AtomicBool>,
    ) -> (
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        reloading_counted(path, named, accept, Arc::default(), false)
    }

    /// [`reloading_named`] where `done` counts the reloads, this watcher's and those a test
    /// makes as SIGHUP would; with `sighup_after_each`, one more is counted right after each of
    /// the watcher's own (a SIGHUP reload that waited on the lock).
    fn reloading_counted(
        path: &Path,
        named: Vec<PathBuf>,
        accept: Arc<std::sync::atomic::AtomicBool>,
        done: Arc<std::sync::atomic::AtomicU64>,
        sighup_after_each: bool,
    ) -> (
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        let watching = watch(path.to_path_buf(), named.clone()).expect("watch");
        let (tx, rx) = mpsc::unbounded_channel();
        let read = path.to_path_buf();
        let counted = Arc::clone(&done);
        let reload = move || {
            // An unreadable file is reloaded (and rejected) as an empty one.
            let _ = tx.send(std::fs::read(&read).unwrap_or_default());
            let done = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if sighup_after_each {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            let accept = accept.load(std::sync::atomic::Ordering::SeqCst);
            let readable = read.exists();
            let named = named.clone();
            async move { ((accept && readable).then_some(named), done) }
        };
        let reloads_done = move || done.load(std::sync::atomic::Ordering::SeqCst);
        // As a config: an empty file is not one.
        let valid = |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        (
            tokio::spawn(watching.run_with(reload, reloads_done, valid)),
            rx,
        )
    }

    fn reloading(
        path: &Path,
        accept: Arc<std::sync::atomic::AtomicBool>,
    ) -> (
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        reloading_named(path, Vec::new(), accept)
    }

    /// Whether no reload comes within a burst's longest delay and then some.
    async fn no_reload(rx: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> bool {
        tokio::time::timeout(QUIET + MAX_DELAY, rx.recv())
            .await
            .is_err()
    }

    /// The content of the next reload within [`SOON`], if any.
    async fn next_reload(rx: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Option<String> {
        let read = tokio::time::timeout(SOON, rx.recv()).await.ok().flatten()?;
        Some(String::from_utf8_lossy(&read).into_owned())
    }

    /// `ln -sfn target link`: a new link renamed over the old one.
    fn repoint(target: &Path, link: &Path) {
        let staged = link.with_extension("staged");
        std::os::unix::fs::symlink(target, &staged).expect("symlink");
        std::fs::rename(&staged, link).expect("rename the link into place");
    }

    fn accepting() -> Arc<std::sync::atomic::AtomicBool> {
        Arc::new(std::sync::atomic::AtomicBool::new(true))
    }

    #[tokio::test]
    async fn a_file_link_pointed_elsewhere_is_followed_there() {
        let top = tempfile::tempdir().expect("temp dir");
        for dir in ["a", "b", "conf"] {
            std::fs::create_dir(top.path().join(dir)).expect("mkdir");
        }
        std::fs::write(top.path().join("a/real.toml"), "a = 1\n").expect("write");
        std::fs::write(top.path().join("b/real.toml"), "b = 1\n").expect("write");
        let path = top.path().join("conf/veer.toml");
        std::os::unix::fs::symlink("../a/real.toml", &path).expect("symlink");
        let (task, mut reloads) = reloading(&path, accepting());
        repoint(Path::new("../b/real.toml"), &path);
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("b = 1\n"));
        // Written in place where the link leads now, under another name.
        std::fs::write(top.path().join("b/real.toml"), "b = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("b = 2\n"));
        task.abort();
    }

    #[tokio::test]
    async fn a_swapped_directory_link_is_seen_and_followed() {
        let top = tempfile::tempdir().expect("temp dir");
        for release in ["release-1", "release-2"] {
            std::fs::create_dir(top.path().join(release)).expect("mkdir");
            std::fs::write(
                top.path().join(release).join("veer.toml"),
                format!("r = \"{release}\"\n"),
            )
            .expect("write");
        }
        let current = top.path().join("current");
        std::os::unix::fs::symlink("release-1", &current).expect("symlink");
        let (task, mut reloads) = reloading(&current.join("veer.toml"), accepting());
        repoint(Path::new("release-2"), &current);
        assert_eq!(
            next_reload(&mut reloads).await.as_deref(),
            Some("r = \"release-2\"\n")
        );
        std::fs::write(top.path().join("release-2/veer.toml"), "r = 3\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("r = 3\n"));
        task.abort();
    }

    #[tokio::test]
    async fn a_directory_deleted_and_made_again_later_is_watched_again() {
        let top = tempfile::tempdir().expect("temp dir");
        let conf = top.path().join("conf");
        std::fs::create_dir(&conf).expect("mkdir");
        let path = conf.join("veer.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        let (task, mut reloads) = reloading(&path, accepting());
        std::fs::remove_dir_all(&conf).expect("rm -rf");
        // Once the removal's burst settled with the directory still gone, the config it took
        // is reloaded to be rejected (read as nothing here).
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some(""));
        std::fs::create_dir(&conf).expect("mkdir");
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        std::fs::write(&path, "a = 3\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 3\n"));
        task.abort();
    }

    /// A file refused for a certificate it names that is not there yet is applied when saved
    /// again unchanged, once the certificate is there.
    #[tokio::test]
    async fn a_rejected_file_saved_again_unchanged_is_tried_again() {
        let (_dir, path, watching) = watched();
        drop(watching);
        let accept = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (task, mut reloads) = reloading(&path, Arc::clone(&accept));
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        accept.store(true, std::sync::atomic::Ordering::SeqCst);
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        // Applied: the same bytes again are not.
        std::fs::write(&path, "a = 2\n").expect("write");
        assert!(
            no_reload(&mut reloads).await,
            "an applied file was reloaded unchanged"
        );
        task.abort();
    }

    /// A file saved in place and read between its truncation and its writing (the read came
    /// at the end of the truncation's quiet) is read again once written, not rejected empty.
    #[tokio::test]
    async fn a_save_in_place_read_before_its_writing_is_read_again_once_written() {
        let (_dir, path, watching) = watched();
        drop(watching);
        let (task, mut reloads) = reloading(&path, accepting());
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        let file = std::fs::File::create(&path).expect("truncate");
        // Past the truncation's quiet, well within the gap a save may take.
        tokio::time::sleep(DEBOUNCE + (SAVE_GAP / 2)).await;
        (&file).write_all(b"a = 3\n").expect("write");
        drop(file);
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 3\n"));
        task.abort();
    }

    /// A file changed, reloaded by SIGHUP (or the admin API), then changed back to what this
    /// watcher last applied, is reloaded: what is in force is what SIGHUP read, not the file.
    #[tokio::test]
    async fn a_file_changed_back_after_a_reload_elsewhere_is_reloaded() {
        let (_dir, path, watching) = watched();
        drop(watching);
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (task, mut reloads) =
            reloading_counted(&path, Vec::new(), accepting(), Arc::clone(&done), false);
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        // Within one burst: B written and reloaded by SIGHUP, then A written back.
        std::fs::write(&path, "a = 3\n").expect("write");
        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        // Nothing else reloaded since: the same bytes again are not.
        std::fs::write(&path, "a = 2\n").expect("write");
        assert!(no_reload(&mut reloads).await, "reloaded unchanged");
        task.abort();
    }

    /// A SIGHUP reload that ends right after the watcher's own (it waited for the lock) is
    /// one this watcher has not seen: the file written back to what the watcher applied is
    /// reloaded, since what is in force is what SIGHUP read.
    #[tokio::test]
    async fn a_reload_elsewhere_right_after_the_watchers_own_is_not_taken_for_seen() {
        let (_dir, path, watching) = watched();
        drop(watching);
        let (task, mut reloads) =
            reloading_counted(&path, Vec::new(), accepting(), Arc::default(), true);
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        task.abort();
    }

    /// A config deleted (or made unreadable) is reloaded once, to be rejected where it is seen
    /// (the log, the counter, the admin API), not passed over in silence; back with the very
    /// content in force, it is reloaded again (the last reload was a rejection).
    #[tokio::test]
    async fn a_deleted_config_is_reloaded_once_and_again_when_it_is_back() {
        let (_dir, path, watching) = watched();
        drop(watching);
        let (task, mut reloads) = reloading(&path, accepting());
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some(""));
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        task.abort();
    }

    /// A renewed certificate reloads the config, unchanged: written in place, or, as certbot
    /// renews, by re-pointing the link the config names to a new file.
    #[tokio::test]
    async fn a_changed_file_the_config_names_reloads_it() {
        let top = tempfile::tempdir().expect("temp dir");
        let path = top.path().join("veer.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        let (live, archive) = (top.path().join("live"), top.path().join("archive"));
        std::fs::create_dir(&live).expect("mkdir");
        std::fs::create_dir(&archive).expect("mkdir");
        std::fs::write(archive.join("cert1.pem"), "one").expect("write");
        let cert = live.join("cert.pem");
        std::os::unix::fs::symlink("../archive/cert1.pem", &cert).expect("symlink");
        let key = top.path().join("key.pem");
        std::fs::write(&key, "key one").expect("write");
        let (task, mut reloads) =
            reloading_named(&path, vec![cert.clone(), key.clone()], accepting());
        std::fs::write(&key, "key two").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 1\n"));
        std::fs::write(archive.join("cert2.pem"), "two").expect("write");
        repoint(Path::new("../archive/cert2.pem"), &cert);
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 1\n"));
        // Other files next to them do not.
        std::fs::write(archive.join("notes.txt"), "x").expect("write");
        std::fs::write(archive.join("notes.txt"), "y").expect("write");
        assert!(
            no_reload(&mut reloads).await,
            "a write to an unrelated file reloaded the config"
        );
        task.abort();
    }

    /// A config applied naming other files is watched for those: the old ones no longer count.
    #[tokio::test]
    async fn the_files_watched_follow_the_config_applied() {
        let top = tempfile::tempdir().expect("temp dir");
        let path = top.path().join("veer.toml");
        std::fs::write(&path, "a = 1\n").expect("write");
        let (old, new) = (top.path().join("old.pem"), top.path().join("new.pem"));
        std::fs::write(&old, "old").expect("write");
        std::fs::write(&new, "new").expect("write");
        let watching = watch(path.clone(), vec![old.clone()]).expect("watch");
        let (tx, mut reloads) = mpsc::unbounded_channel();
        let read = path.clone();
        let named = new.clone();
        let reload = move || {
            let _ = tx.send(std::fs::read(&read).unwrap_or_default());
            let named = vec![named.clone()];
            async move { (Some(named), 0) }
        };
        let task = tokio::spawn(watching.run_with(reload, || 0, |_: &Path| true));
        std::fs::write(&path, "a = 2\n").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        std::fs::write(&new, "newer").expect("write");
        assert_eq!(next_reload(&mut reloads).await.as_deref(), Some("a = 2\n"));
        std::fs::write(&old, "older").expect("write");
        assert!(
            no_reload(&mut reloads).await,
            "a file the config no longer names reloaded it"
        );
        task.abort();
    }
}
