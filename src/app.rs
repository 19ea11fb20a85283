//! Wiring: listeners, routing snapshot, controller, admin API, config watcher, reload and
//! graceful shutdown.

use std::fs::{File, OpenOptions, TryLockError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::access_log::AccessLogger;
use crate::admin;
use crate::config::{Config, ConfigError, ConfigErrors, RouteConfig};
use crate::listener::workers::Workers;
use crate::listener::{self, tls, Listener};
use crate::proxy::error::ClientErrors;
use crate::proxy::Proxy;
use crate::rollout::{self, Store};
use crate::routing::{RouteShared, RoutingTable};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {addr} ({key}): {source}")]
    Bind {
        addr: SocketAddr,
        /// The config key the address is from.
        key: &'static str,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::AccessLogError),
    #[error("state.dir: cannot use {path:?}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state.dir: {path:?} is in use by another veer (it holds the lock on {lock:?}); give \
         each instance its own state.dir"
    )]
    StateInUse { path: PathBuf, lock: PathBuf },
}

/// The outcome of the last reload, for the admin API.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub at: Option<String>,
    pub result: Option<&'static str>,
    pub errors: Vec<ConfigError>,
}

/// Everything the running process shares.
pub struct App {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub store: Arc<Store>,
    pub config_path: Option<PathBuf>,
    pub reloads_applied: AtomicU64,
    pub reloads_rejected: AtomicU64,
    pub last_reload: Mutex<ReloadStatus>,
    pub connections: Vec<(String, Arc<AtomicI64>)>,
    pub ready: AtomicBool,
    pub access_log: Option<AccessLogger>,
    /// veer's own 4xx answers, by reason, counted by every worker.
    pub client_errors: Arc<ClientErrors>,
    tls: Arc<ArcSwapOption<tokio_rustls::TlsAcceptor>>,
    /// When the served certificate expires (Unix seconds), or [`NO_CERTIFICATE`].
    pub tls_not_after: AtomicI64,
    reload_lock: tokio::sync::Mutex<()>,
}

/// `App::tls_not_after` without TLS, or with a certificate whose validity was not read.
pub const NO_CERTIFICATE: i64 = i64::MIN;

/// `App::tls_not_after` for a served certificate's `validity`.
fn not_after(validity: Option<tls::Validity>) -> i64 {
    validity.map_or(NO_CERTIFICATE, |v| v.not_after)
}

/// A started instance: where it listens and how to stop it.
pub struct Running {
    pub app: Arc<App>,
    pub proxy_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// The admin API's own stop: after the drain, so that probes and metrics answer during it
    /// (`/readyz` with 503).
    admin_stop: watch::Sender<bool>,
    graceful: Arc<GracefulShutdown>,
    listeners: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    workers: Workers,
    /// The lock on the state dir, released when this instance is dropped (kept by
    /// [`keep_state_lock`] meanwhile).
    _state_lock: Arc<Mutex<File>>,
}

/// Builds a snapshot, carrying each route's long-lived state over from `previous` by name
/// and restoring new routes from the state dir. Each route's rollout is then brought in line
/// with the new config by [`reconcile_routes`], before the snapshot is published.
fn build_table(
    config: Config,
    previous: Option<&RoutingTable>,
    store: &Arc<Store>,
) -> RoutingTable {
    RoutingTable::new(config, |rc| {
        let old = previous.and_then(|t| t.route(&rc.name));
        let shared = match old {
            Some(old) => Arc::clone(&old.shared),
            None => rollout::restore(rc, store),
        };
        label_versions(&shared, rc, old.is_some());
        if old.is_some_and(|old| shadow_endpoints(&old.config) != shadow_endpoints(rc)) {
            shared.shadow.new_endpoints();
        }
        shared
    })
}

/// The endpoints of the route's shadow, when it has one.
fn shadow_endpoints(config: &RouteConfig) -> Option<&[String]> {
    config.shadow.as_ref().map(|s| s.endpoints.as_slice())
}

/// Brings each route's rollout in line with the config of the `next` snapshot (see
/// `rollout::reconcile`). Called before the snapshot is published: a weight it changes (a
/// rollout started by a reload, say) is the current split of the snapshot's generation, and
/// the old snapshot's requests keep the split they had (see `SharedSplit`), so neither meets
/// the other's endpoints at the wrong weight.
fn reconcile_routes(next: &RoutingTable, previous: Option<&RoutingTable>) {
    for route in next.routes() {
        let old = previous.and_then(|t| t.route(&route.config.name));
        rollout::reconcile(&route.shared, &route.config, old.map(|o| &o.config));
    }
}

/// Gives each slot's metrics its `version` label from `config`. A slot whose label changed
/// starts its per-version figures fresh (see `SlotMetrics::set_version`); this runs before the
/// new snapshot is stored, so a request still finishing on the old one and recorded from here
/// on counts under the new label.
fn label_versions(shared: &RouteShared, config: &RouteConfig, reloaded: bool) {
    for slot in crate::Slot::BOTH {
        let version = &config.slot(slot).version;
        if shared.slot_metrics(slot).set_version(version) && reloaded {
            info!(route = %config.name, %slot, version = %version, "Version label changed; its request counts start at 0.");
        }
    }
}

/// Takes `state.dir` for this instance: an exclusive advisory lock on `state.dir/veer.lock`,
/// held while the file stays open. Two instances on one dir would overwrite each other's
/// rollout state and journal.
fn lock_state_dir(dir: &Path) -> Result<File, AppError> {
    let io = |source| AppError::State {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let lock = dir.join("veer.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| AppError::State {
            path: lock.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(AppError::StateInUse {
            path: dir.to_path_buf(),
            lock,
        }),
        Err(TryLockError::Error(source)) => Err(AppError::State { path: lock, source }),
    }
}

/// Keeps the lock on `state.dir` while the instance runs: a state dir (or lock file) deleted
/// under a running veer leaves its lock on a file that no path names, and a second veer could
/// take the dir. Checked every second; the lock file is made and locked again when its path
/// no longer names the one held. Stops when the instance drops the lock.
async fn keep_state_lock(dir: PathBuf, held: std::sync::Weak<Mutex<File>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(held) = held.upgrade() else {
            return;
        };
        let mut file = held.lock().unwrap_or_else(PoisonError::into_inner);
        if crate::io::names(&dir.join("veer.lock"), &file) {
            continue;
        }
        match lock_state_dir(&dir) {
            Ok(again) => {
                warn!(dir = %dir.display(), "The state dir's lock file was removed; it is made and locked again.");
                *file = again;
                failing = false;
            }
            Err(error) if !failing => {
                tracing::error!(%error, "The state dir's lock file was removed and cannot be taken again.");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Binds everything and starts serving. Errors here are startup failures (exit code 2).
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Running, AppError> {
    let state_dir = config.state.dir.clone();
    let state_lock = Arc::new(Mutex::new(lock_state_dir(&state_dir)?));
    let store =
        Store::open(&config.state).map_err(|(path, source)| AppError::State { path, source })?;
    let store = Arc::new(store);
    let (tls_acceptor, tls_validity) = match &config.server.tls {
        Some(t) => {
            let (acceptor, validity) = tls::acceptor(t)?;
            (Some(Arc::new(acceptor)), validity)
        }
        None => (None, None),
    };
    let access_log = AccessLogger::start(&config.server.access_log)?;
    let workers = Workers::start(config.server.workers).map_err(AppError::Workers)?;
    // sockets[address][worker]
    let mut sockets = Vec::with_capacity(config.server.listen.len());
    for &addr in &config.server.listen {
        let bound = listener::workers::bind(addr, workers.handles().len()).map_err(|source| {
            AppError::Bind {
                addr,
                key: "server.listen",
                source,
            }
        })?;
        sockets.push(bound);
    }
    let proxy_addrs: Vec<SocketAddr> = sockets
        .iter()
        .filter_map(|bound| bound.first().and_then(|s| s.local_addr().ok()))
        .collect();
    let connections: Vec<(String, Arc<AtomicI64>)> = proxy_addrs
        .iter()
        .map(|addr| (addr.to_string(), Arc::new(AtomicI64::new(0))))
        .collect();
    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.admin.listen,
            key: "admin.listen",
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| AppError::Bind {
            addr: config.admin.listen,
            key: "admin.listen",
            source,
        })?;
    let table = build_table(config, None, &store);
    reconcile_routes(&table, None);
    let table = Arc::new(ArcSwap::from_pointee(table));
    let app = Arc::new(App {
        table: Arc::clone(&table),
        store,
        config_path,
        reloads_applied: AtomicU64::new(0),
        reloads_rejected: AtomicU64::new(0),
        last_reload: Mutex::new(ReloadStatus::default()),
        connections,
        ready: AtomicBool::new(false),
        access_log: access_log.clone(),
        client_errors: Arc::default(),
        tls: Arc::new(ArcSwapOption::new(tls_acceptor)),
        tls_not_after: AtomicI64::new(not_after(tls_validity)),
        reload_lock: tokio::sync::Mutex::new(()),
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    for addr in &proxy_addrs {
        info!(listen = %addr, tls = app.tls.load().is_some(), workers = workers.handles().len(), "Proxy listening.");
    }
    let mut per_worker: Vec<Vec<(std::net::TcpListener, Arc<AtomicI64>)>> =
        workers.handles().iter().map(|_| Vec::new()).collect();
    for (bound, (_, gauge)) in sockets.into_iter().zip(&app.connections) {
        for (socket, mine) in bound.into_iter().zip(per_worker.iter_mut()) {
            mine.push((socket, Arc::clone(gauge)));
        }
    }
    let mut accept_loops = Vec::new();
    for (handle, mine) in workers.handles().iter().zip(per_worker) {
        accept_loops.push(handle.spawn(serve_worker(
            mine,
            Arc::clone(&table),
            access_log.clone(),
            Arc::clone(&app.client_errors),
            Arc::clone(&app.tls),
            Arc::clone(&graceful),
            shutdown_rx.clone(),
        )));
    }
    let mut tasks = Vec::new();
    info!(listen = %admin_addr, "Admin API listening.");
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    tasks.push(tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&app),
        admin_stop_rx,
    )));
    tasks.push(tokio::spawn(rollout::run(Arc::clone(&table))));
    tasks.push(tokio::spawn(rotate_windows(Arc::clone(&table))));
    tasks.push(tokio::spawn(keep_state_lock(
        state_dir,
        Arc::downgrade(&state_lock),
    )));
    if let Some(path) = app.config_path.clone() {
        // Both listen from here on, before `start` returns: a change or a SIGHUP right after
        // start is not missed (and SIGHUP never falls back to its default, ending the process).
        if let Some(watching) = crate::config::watch::watch(path, app.named_files()) {
            tasks.push(tokio::spawn(watching.run(Arc::clone(&app))));
        }
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(hup) => tasks.push(tokio::spawn(reload_on_sighup(hup, Arc::clone(&app)))),
            Err(error) => warn!(%error, "Cannot listen for SIGHUP."),
        }
    }
    app.ready.store(true, Ordering::Release);
    Ok(Running {
        app,
        proxy_addrs,
        admin_addr,
        shutdown,
        admin_stop,
        graceful,
        listeners: accept_loops,
        tasks,
        workers,
        _state_lock: state_lock,
    })
}

/// One worker: its own proxy (and upstream pool) and an accept loop per listen address.
async fn serve_worker(
    sockets: Vec<(std::net::TcpListener, Arc<AtomicI64>)>,
    table: Arc<ArcSwap<RoutingTable>>,
    access_log: Option<AccessLogger>,
    client_errors: Arc<ClientErrors>,
    tls: Arc<ArcSwapOption<tokio_rustls::TlsAcceptor>>,
    graceful: Arc<GracefulShutdown>,
    shutdown: watch::Receiver<bool>,
) {
    // Idle upstream connections are closed about one idle timeout late at most (checked no
    // more often than every 100 ms, whatever the timeout).
    let every = table
        .load()
        .config
        .server
        .upstream_idle_timeout
        .max(std::time::Duration::from_millis(100));
    let proxy = Arc::new(Proxy::new(table, access_log, client_errors));
    let expiry = tokio::spawn({
        let proxy = Arc::clone(&proxy);
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                proxy.expire_idle();
            }
        }
    });
    let mut loops = Vec::with_capacity(sockets.len());
    for (socket, gauge) in sockets {
        match Listener::from_std(socket, gauge) {
            Ok(listener) => loops.push(tokio::spawn(listener.serve(
                Arc::clone(&proxy),
                Arc::clone(&tls),
                Arc::clone(&graceful),
                shutdown.clone(),
            ))),
            Err(error) => warn!(%error, "Cannot register a listener with its worker."),
        }
    }
    drop(graceful);
    for accept_loop in loops {
        let _ = accept_loop.await;
    }
    expiry.abort();
}

impl Running {
    /// Stops accepting, lets in-flight requests finish up to `drain_timeout`, then stops.
    pub async fn shutdown(self) {
        let drain = self.app.table.load().config.server.drain_timeout;
        self.app.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for accept_loop in self.listeners {
            // The accept loops end on the signal and drop their handle on `graceful`.
            let _ = accept_loop.await;
        }
        let graceful = Arc::try_unwrap(self.graceful);
        match graceful {
            Ok(graceful) => {
                if tokio::time::timeout(drain, graceful.shutdown())
                    .await
                    .is_err()
                {
                    warn!(drain = ?drain, "Drain timeout reached; closing remaining connections.");
                }
            }
            Err(_) => warn!("Listeners still running; not draining."),
        }
        let _ = self.admin_stop.send(true);
        for task in self.tasks {
            task.abort();
        }
        self.workers.stop().await;
        // A state whose save failed while running gets a last try: else the next start would
        // restore an older one.
        for route in self.app.table.load().routes() {
            if !rollout::save_if_unsaved(&route.shared) {
                warn!(
                    route = route.name(),
                    "Rollout state not saved at shutdown; the next start restores an older one."
                );
            }
        }
        info!("Stopped.");
    }
}

/// Resolves once the shutdown signal is set (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Runs until SIGTERM or SIGINT, then drains; a second signal stops it at once. The signals
/// are caught from before the listeners open, so none ends veer without a drain.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), AppError> {
    let mut stop = StopSignals::new();
    let running = start(config, config_path).await?;
    stop.recv().await;
    info!("Shutting down.");
    tokio::select! {
        () = running.shutdown() => {}
        () = stop.recv() => {
            warn!("Second signal: stopping now, without waiting for requests in flight.");
        }
    }
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment this is made.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let catch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(error) => {
                warn!(%error, "Cannot listen for {name}.");
                None
            }
        };
        StopSignals {
            term: catch(SignalKind::terminate(), "SIGTERM"),
            int: catch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT (never, when neither can be listened for).
    async fn recv(&mut self) {
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(&mut self.term) => {}
            () = next(&mut self.int) => {}
        }
    }
}

async fn reload_on_sighup(mut hup: tokio::signal::unix::Signal, app: Arc<App>) {
    while hup.recv().await.is_some() {
        info!("SIGHUP: reloading.");
        let _ = app.reload().await;
    }
}

/// Advances every slot's sliding window, off the request path.
async fn rotate_windows(table: Arc<ArcSwap<RoutingTable>>) {
    crate::metrics::rotate_every_slice(move || {
        for route in table.load().routes() {
            for metrics in &route.shared.metrics {
                metrics.rotate();
            }
            route.shared.shadow_metrics.rotate();
        }
    })
    .await;
}

impl App {
    /// The files the config in force names and reads at a reload: the TLS certificate and key.
    pub fn named_files(&self) -> Vec<PathBuf> {
        let table = self.table.load();
        match &table.config.server.tls {
            Some(tls) => vec![tls.cert.clone(), tls.key.clone()],
            None => Vec::new(),
        }
    }

    /// How many reloads were done so far, applied or rejected, by any path.
    pub fn reloads_done(&self) -> u64 {
        self.reloads_applied.load(Ordering::Relaxed) + self.reloads_rejected.load(Ordering::Relaxed)
    }

    /// Waits for a reload under way to end, and holds the next one off while the guard lives:
    /// an admin action on a route goes by the config that is published, and a reload does
    /// not bring the route's state in line with a new config under it.
    pub async fn between_reloads(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reload_lock.lock().await
    }

    /// Re-reads the config file; applies it whole or not at all.
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        self.reload_counted().await.0
    }

    /// [`App::reload`], with [`App::reloads_done`] as it stood when this one ended (read
    /// before another reload can begin).
    pub async fn reload_counted(&self) -> (Result<(), ConfigErrors>, u64) {
        let _guard = self.reload_lock.lock().await;
        // Whatever becomes of the config: `SIGHUP` after a log rotation must reopen the log.
        if let Some(log) = &self.access_log {
            log.reopen();
        }
        let result = self.try_reload();
        let (label, errors) = match &result {
            Ok(()) => {
                self.reloads_applied.fetch_add(1, Ordering::Relaxed);
                info!("Config reloaded.");
                ("applied", Vec::new())
            }
            Err(errors) => {
                self.reloads_rejected.fetch_add(1, Ordering::Relaxed);
                warn!(errors = %errors, "Config rejected; the previous one keeps serving.");
                ("rejected", errors.0.clone())
            }
        };
        if let Ok(mut status) = self.last_reload.lock() {
            *status = ReloadStatus {
                at: Some(crate::rollout::journal::now_rfc3339()),
                result: Some(label),
                errors,
            };
        }
        (result, self.reloads_done())
    }

    fn try_reload(&self) -> Result<(), ConfigErrors> {
        let Some(path) = &self.config_path else {
            return Err(ConfigErrors::single(ConfigError {
                path: String::new(),
                line: None,
                message: "no config file to reload (started without one)".into(),
            }));
        };
        let text = Config::read(path)?;
        let config =
            crate::config::parse_for(&text, path.parent(), crate::config::Purpose::Reload)?;
        let restart_error = |key: &str, message: &str| ConfigError {
            path: key.to_string(),
            // `admin.token` may be given as `admin.token_env`.
            line: crate::config::key_line(&text, key)
                .or_else(|| crate::config::key_line(&text, &format!("{key}_env"))),
            message: message.to_string(),
        };
        let current = self.table.load_full();
        let old = &current.config;
        let (new, was) = (&config.server, &old.server);
        // Every key changed that needs a restart, each named: the reload is rejected whole.
        let fixed = [
            (
                "server.listen",
                new.listen != was.listen,
                "changing listeners",
            ),
            (
                "server.workers",
                new.workers != was.workers,
                "changing this",
            ),
            (
                "server.connect_timeout",
                new.connect_timeout != was.connect_timeout,
                "changing this",
            ),
            (
                "server.upstream_idle_timeout",
                new.upstream_idle_timeout != was.upstream_idle_timeout,
                "changing this",
            ),
            (
                "server.access_log",
                new.access_log != was.access_log,
                "changing this",
            ),
            (
                "server.tls",
                new.tls.is_some() != was.tls.is_some(),
                "turning TLS on or off",
            ),
            (
                "admin.listen",
                config.admin.listen != old.admin.listen,
                "changing the admin listener",
            ),
            (
                "admin.token",
                config.admin.token != old.admin.token,
                "changing the admin token",
            ),
            (
                "state.dir",
                config.state != old.state,
                "changing the state dir",
            ),
        ];
        let restart: Vec<ConfigError> = fixed
            .iter()
            .filter(|(_, changed, _)| *changed)
            .map(|(key, _, what)| restart_error(key, &format!("{what} needs a restart")))
            .collect();
        if !restart.is_empty() {
            return Err(ConfigErrors(restart));
        }
        if let Some(tls_config) = &config.server.tls {
            let (acceptor, validity) = tls::acceptor(tls_config)
                .map_err(|e| ConfigErrors::single(restart_error("server.tls", &e.to_string())))?;
            self.tls.store(Some(Arc::new(acceptor)));
            self.tls_not_after
                .store(not_after(validity), Ordering::Relaxed);
        }
        // A removed route's state file stays: if it comes back, by a reload or a restart, it
        // gets its rollout back, as a restart with the file that still has it would give it.
        for route in old
            .routes
            .iter()
            .filter(|r| config.route(&r.name).is_none())
        {
            info!(route = %route.name, "Route removed; its rollout state is kept in state.dir.");
        }
        for warning in crate::config::warnings(&config, &text) {
            warn!("{warning}");
        }
        // From here to the store nothing may return: the table's routes began a generation of
        // their splits (see `SharedSplit`), and the published table's requests would go by
        // the split of the one before.
        let table = build_table(config, Some(&current), &self.store);
        reconcile_routes(&table, Some(&current));
        self.table.store(Arc::new(table));
        Ok(())
    }
}
