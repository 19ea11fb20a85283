//! The `veer` command: CLI, logging, config loading; everything else lives in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use veer::cli;
use veer::config::Config;

#[derive(Parser)]
#[command(
    name = "veer",
    version,
    about = "A reverse proxy that shifts traffic from blue to green by itself, on evidence."
)]
struct Cli {
    /// Config file: the one to run or check. `status`, `rollout` and `health` take the admin
    /// API's address and token from it.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr (RUST_LOG sets the level).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run,
    /// Validate a config: every problem with its key path and line.
    Check,
    /// A self-contained rollout demo on loopback: upstreams, proxy, load, live view.
    Demo(veer::demo::DemoOptions),
    /// One table of every route: stable, weight, phase, per-slot req/s, error %, p99.
    Status(AdminArgs),
    /// Exit 0 when the admin API answers `/healthz` with 200, else 1 (container health checks).
    Health(AdminArgs),
    /// Drive a route's rollout (same as the admin API POSTs).
    Rollout {
        #[arg(value_parser = ["start", "pause", "resume", "promote", "rollback"])]
        action: String,
        route: String,
        #[command(flatten)]
        target: AdminArgs,
    },
}

/// Where an admin command finds the admin API: each flag, else the `-c` file's `[admin]`, else
/// the environment, else the default URL and no token.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin API URL, or its ip:port [default: -c FILE's admin.listen, else $VEER_ADMIN, else
    /// http://127.0.0.1:9901]
    #[arg(long)]
    admin: Option<String>,
    /// Bearer token [default: -c FILE's admin token, else $VEER_ADMIN_TOKEN]
    #[arg(long)]
    token: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let code = if error.use_stderr() { 1 } else { 0 };
            let _ = error.print();
            return ExitCode::from(code);
        }
    };
    if cli.command.is_none() && cli.config.is_none() {
        // Plain `veer`: what it can do, as a usage error (it was given nothing to run).
        use clap::CommandFactory;
        eprint!("{}", Cli::command().render_help());
        return ExitCode::from(1);
    }
    let command = cli.command.unwrap_or(Command::Run);
    // The demo draws a live view on stdout; its logs would only scroll it away. Its drain is
    // cut short on purpose (a hanging green's requests are still open at the end), and a green
    // made slower than its timeout fails on purpose (the view shows its errors).
    let level = match command {
        Command::Demo(_) => "warn,veer::app=error,veer::proxy=error",
        _ => "info",
    };
    init_tracing(cli.log_format, level);
    match command {
        Command::Run => match &cli.config {
            Some(path) => run(path, cli.log_format),
            None => usage("veer run needs -c FILE"),
        },
        Command::Check => match &cli.config {
            Some(path) => check(path),
            None => usage("veer check needs -c FILE"),
        },
        Command::Demo(_) if cli.config.is_some() => {
            usage("veer demo takes no -c FILE: it makes its own config on loopback")
        }
        Command::Demo(options) => {
            raise_open_files_limit();
            let result = block_on(veer::demo::run(options));
            let interrupted = result.as_ref().err().and_then(|error| {
                error
                    .downcast_ref::<veer::demo::Interrupted>()
                    .map(|i| i.code)
            });
            report(result, interrupted.unwrap_or(2))
        }
        Command::Status(target) => match admin_target(target, cli.config.as_deref()) {
            Ok((admin, token)) => report_admin(block_on(cli::status(&admin, token.as_deref()))),
            Err(code) => code,
        },
        Command::Health(target) => match admin_target(target, cli.config.as_deref()) {
            Ok((admin, token)) => report(block_on(cli::health(&admin, token.as_deref())), 1),
            Err(code) => code,
        },
        Command::Rollout {
            action,
            route,
            target,
        } => match admin_target(target, cli.config.as_deref()) {
            Ok((admin, token)) => report_admin(block_on(cli::rollout(
                &admin,
                token.as_deref(),
                &action,
                &route,
            ))),
            Err(code) => code,
        },
    }
}

/// The admin URL and token of an admin command (see [`AdminArgs`]). Only the `[admin]` table
/// of a config file is read, loosely: a file the proxy would reject for another reason (a
/// typo in a route, a key file this user cannot read) still names its admin API, so that
/// `veer health -c FILE` never fails a healthy proxy over an unrelated edit. A file that is not
/// TOML, or whose admin port is chosen at start, is a usage error.
fn admin_target(
    args: AdminArgs,
    config: Option<&Path>,
) -> Result<(String, Option<String>), ExitCode> {
    let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let file = match config {
        Some(path) => Some(admin_table(path)?),
        None => None,
    };
    let text = |table: &toml::Table, key: &str| {
        table
            .get(key)
            .and_then(|value| value.as_str())
            .map(String::from)
    };
    let admin = match (args.admin, &file) {
        (Some(admin), _) => admin,
        (None, Some(table)) => {
            let listen = text(table, "listen").unwrap_or_else(|| "127.0.0.1:9901".into());
            match listen.parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.port() == 0 => {
                    return Err(usage(
                        "admin.listen has port 0 (chosen at start): give the admin API with \
                         --admin URL",
                    ))
                }
                Ok(addr) => cli::admin_url(addr),
                // A name, such as localhost:9901, as the proxy accepts it.
                Err(_)
                    if listen.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                    }) =>
                {
                    format!("http://{listen}")
                }
                Err(_) => {
                    return Err(usage(&format!(
                        "admin.listen {listen:?} is not an address like 127.0.0.1:9901"
                    )))
                }
            }
        }
        (None, None) => env("VEER_ADMIN").unwrap_or_else(|| "http://127.0.0.1:9901".into()),
    };
    let in_file = |key| file.as_ref().and_then(|table| text(table, key));
    let token_env = in_file("token_env");
    let token = args
        .token
        .or_else(|| in_file("token"))
        .or_else(|| env(token_env.as_deref()?))
        .or_else(|| env("VEER_ADMIN_TOKEN"));
    // The file says where the token is: not there is an error, not "no token".
    if let (None, Some(var)) = (&token, token_env) {
        let path = config.map(|p| p.display().to_string()).unwrap_or_default();
        return Err(usage(&format!(
            "{path}: admin.token_env: environment variable {var} is not set (or give the \
             token with --token)"
        )));
    }
    Ok((admin, token))
}

/// The `[admin]` table of a config file (empty when it has none).
fn admin_table(path: &Path) -> Result<toml::Table, ExitCode> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| usage(&format!("cannot read {}: {error}", path.display())))?;
    let mut file: toml::Table = text.parse().map_err(|error: toml::de::Error| {
        usage(&format!(
            "{}: not a TOML file: {}",
            path.display(),
            error.message()
        ))
    })?;
    let admin = match file.remove("admin") {
        Some(toml::Value::Table(admin)) => admin,
        None => toml::Table::new(),
        Some(_) => return Err(usage(&format!("{}: admin is not a table", path.display()))),
    };
    for key in ["listen", "token", "token_env"] {
        if admin.get(key).is_some_and(|value| !value.is_str()) {
            return Err(usage(&format!(
                "{}: admin.{key} is not a string",
                path.display()
            )));
        }
    }
    Ok(admin)
}

fn init_tracing(format: LogFormat, default_level: &str) {
    // notify reports its own bookkeeping at info and warn (a watch the kernel already dropped
    // when a watched file or directory was removed, as every Kubernetes Secret or ConfigMap
    // swap does): only its errors concern an operator; veer logs what it cannot watch itself.
    // rustls warns about what a client sent (an IP address as SNI, as wrk and `openssl
    // s_client` do): one line per connection that any client could trigger, so only its errors
    // are shown. h2 warns of every PING acknowledgement it did not ask for: a line per 17 bytes
    // a client sends.
    let default = format!("{default_level},notify=error,rustls=error,h2::proto::ping_pong=error");
    let asked = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.is_empty());
    let (filter, rejected) = match asked.as_deref().map(log_filter) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(reason)) => (EnvFilter::new(&default), Some(reason)),
        None => (EnvFilter::new(&default), None),
    };
    // Colours only for a person at a terminal: a pipe, a file, journald or `docker logs` get
    // plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(reason) = rejected {
        tracing::warn!(
            rust_log = asked,
            reason,
            default,
            "RUST_LOG is not a valid filter; using the default."
        );
    }
}

/// A `RUST_LOG` filter, or why it is not one. tracing takes any word for a target, so a target
/// that no Rust module path could be (`garbage!!`) is refused here: it would turn off every log.
fn log_filter(value: &str) -> Result<EnvFilter, String> {
    let target_char = |c: char| c.is_ascii_alphanumeric() || "_:-.".contains(c);
    for directive in value.split(',').map(str::trim) {
        let target = directive.split(['[', '=']).next().unwrap_or("");
        if !target.chars().all(target_char) {
            return Err(format!("{directive:?} is not a target or level"));
        }
    }
    EnvFilter::builder()
        .parse(value)
        .map_err(|error| error.to_string())
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}\n\nFor more information, try '--help'.");
    ExitCode::from(1)
}

fn check(path: &Path) -> ExitCode {
    match Config::load_with_text(path) {
        Ok((config, source)) => {
            let mut text = format!(
                "{}: ok ({} route{})\n",
                path.display(),
                config.routes.len(),
                if config.routes.len() == 1 { "" } else { "s" }
            );
            // Valid, and served, but clients will refuse the certificate (or soon will).
            let tls = config.server.tls.as_ref();
            if let Some(problem) = tls.and_then(veer::listener::tls::certificate_problem) {
                text.push_str(&format!(
                    "{}: warning: server.tls.cert: {problem}\n",
                    path.display()
                ));
            }
            // Valid, and doing nothing.
            for warning in veer::config::warnings(&config, &source) {
                text.push_str(&format!("{}: warning: {warning}\n", path.display()));
            }
            let _ = veer::cli::out(&text);
            ExitCode::SUCCESS
        }
        Err(errors) => {
            let mut text = String::new();
            for error in &errors.0 {
                text.push_str(&format!("{}: {error}\n", path.display()));
            }
            text.push_str(&format!("{} problem(s) found\n", errors.0.len()));
            let _ = veer::cli::out(&text);
            ExitCode::from(1)
        }
    }
}

/// Prints why `veer run` cannot go on: a plain line on stderr, or with `--log-format json` a
/// JSON line shaped like the log's (a log collector reading JSON would not parse a plain one),
/// written whatever `RUST_LOG` filters out.
fn fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Text => eprintln!("{message}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "timestamp": veer::rollout::journal::now_rfc3339(),
                "level": "ERROR",
                "fields": { "message": message },
                "target": "veer",
            })
        ),
    }
}

fn run(path: &Path, format: LogFormat) -> ExitCode {
    let (config, source) = match Config::load_with_text(path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            for error in &errors.0 {
                fatal(format, &format!("{}: {error}", path.display()));
            }
            return ExitCode::from(1);
        }
    };
    for warning in veer::config::warnings(&config, &source) {
        tracing::warn!("{}: {warning}", path.display());
    }
    raise_open_files_limit();
    // Requests are handled on `server.workers` threads of their own (see listener::workers);
    // this runtime only runs the admin API, the controller and the config watcher. On two
    // threads: a state file's fsync (at a reload, a rollout transition, an admin action) may
    // take seconds on a busy disk, and must not hold `/healthz` (a liveness probe) meanwhile;
    // it runs in `block_in_place`, which hands the other tasks and the I/O driver to the other
    // thread (see `StateFiles::save`).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = runtime.context("cannot start the runtime").and_then(|rt| {
        let outcome = rt.block_on(veer::app::run(config, Some(path.to_path_buf())));
        rt.shutdown_timeout(Duration::from_secs(1));
        outcome.context("veer stopped")
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            fatal(format, &format!("error: {}", causes(&error)));
            ExitCode::from(2)
        }
    }
}

/// Every proxied connection takes two descriptors (client and upstream), so the common soft
/// limit of 1,024 would refuse connections from about 500 concurrent clients on. Raise the soft
/// limit to the hard one, as a server is expected to; the hard limit stays the operator's.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "Open files limit."),
        Err(error) => tracing::warn!(%error, "Cannot raise the open files limit."),
    }
}

fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(future)
}

/// The outcome of an admin-API command: 1 for a usage error (a malformed `--admin` URL, token
/// or route name), 2 when the admin API is unreachable or refuses.
fn report_admin<T>(result: anyhow::Result<T>) -> ExitCode {
    let usage = result
        .as_ref()
        .err()
        .and_then(|error| error.downcast_ref::<cli::CliError>())
        .is_some_and(cli::CliError::is_usage);
    report(result, if usage { 1 } else { 2 })
}

fn report<T>(result: anyhow::Result<T>, code: u8) -> ExitCode {
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", causes(&error));
            ExitCode::from(code)
        }
    }
}

/// `error` and its causes, each once: several errors already include their source's text.
fn causes(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if !message.contains(&cause) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&cause);
        }
    }
    message
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
