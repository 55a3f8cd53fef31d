//! The command line: parsing, logging set-up, and dispatch to commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub mod audit;
pub mod memcheck;
pub mod run;
pub mod status;
pub mod supervise;
pub mod watch;

pub use audit::ExitLine;

/// eBPF-assisted memory watchdog and process supervisor.
#[derive(Debug, Parser)]
#[command(name = "watchdog", version, long_version = long_version())]
pub struct Cli {
    /// Log format on standard error [default: text, or the configuration
    /// file's log-format].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream process exits as JSON lines (one object per exit) until
    /// SIGINT or SIGTERM.
    Audit(audit::AuditArgs),
    /// Read a process's (or process tree's) memory exactly, as the limits
    /// see it. Exit 0 under the limit, 1 over it, 2 for usage errors.
    MemCheck(memcheck::MemCheckArgs),
    /// Watch running process trees against a memory limit; report
    /// crossings and exits as JSON lines until SIGINT or SIGTERM, or (with
    /// --pid) until every watched process has exited; --match keeps
    /// watching for processes that start later.
    Watch(watch::WatchArgs),
    /// Run one service in the foreground: keep it under its memory budget,
    /// restart it by the policy, write every decision to the audit log.
    /// SIGTERM / SIGINT drain it and exit 0; giving up exits 1.
    Supervise(Box<supervise::SuperviseArgs>),
    /// Run the daemon: every [[service]] and [[watch]] of the configuration
    /// file, until SIGTERM / SIGINT (drain all, exit 0); SIGHUP reloads.
    Run(run::RunArgs),
    /// Check a configuration file and print it with every default filled
    /// in. Exit 0 when valid, 2 (with the file, line, column and key of the
    /// error) when not.
    CheckConfig(run::CheckConfigArgs),
    /// Ask the running daemon what it is doing: its health, and each
    /// service's and watch target's state, memory, limit and restarts.
    /// Exit 1 when no daemon answers.
    Status(status::StatusArgs),
    /// Print the version; with --verbose, also which form of each kernel
    /// program this kernel takes (found by loading them: needs root).
    Version(VersionArgs),
}

/// Arguments of `watchdog version`.
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Also load the kernel programs and tell which form of each this
    /// kernel takes, and why for each fallback.
    #[arg(long, short)]
    pub verbose: bool,
}

/// A command's failure, with the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// Bad input from the user: exit code 2.
    Usage(String),
    /// Anything else: exit code 1.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(err: anyhow::Error) -> Self {
        Self::Failed(err)
    }
}

/// The pids whose full command line matches `--match PATTERN` (never this
/// watchdog or its ancestors, whose command lines may hold the pattern too),
/// or the usage error that says why there are none.
pub fn matching(pattern: &str) -> Result<Vec<u32>, CliError> {
    let regex = regex::Regex::new(pattern)
        .map_err(|e| CliError::Usage(format!("invalid --match pattern: {e}")))?;
    let matched: Vec<u32> = crate::procs::matching(&regex)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    if matched.is_empty() {
        return Err(CliError::Usage(format!(
            "no process has a command line matching {pattern:?}"
        )));
    }
    Ok(matched)
}

/// `watchdog version [--verbose]`: the version line; with --verbose, the
/// kernel and the forms its programs take here.
fn version(args: &VersionArgs) -> ExitCode {
    println!("watchdog {}", long_version());
    if !args.verbose {
        return ExitCode::SUCCESS;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned());
    println!("kernel: {} {release}", std::env::consts::OS);
    println!("kernel programs: {}", kernel_forms());
    ExitCode::SUCCESS
}

/// Which forms the kernel programs take here, found by loading them (and
/// unloading them at once), or why that could not be found out.
#[cfg(target_os = "linux")]
fn kernel_forms() -> String {
    use crate::kernel::{LoadError, ProbeOptions, Probes};
    if !crate::kernel::built_in() {
        return "not built in".into();
    }
    if crate::procs::in_child_pid_namespace() {
        return "cannot be used in a pid namespace of its own (a container without hostPID)".into();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return format!("unknown (cannot start the async runtime: {e})"),
    };
    match runtime.block_on(async { Probes::load(ProbeOptions::default()) }) {
        Ok(probes) => probes.forms().to_string(),
        Err(LoadError::Privilege { .. }) => {
            "unknown: needs root to find out (they are loaded to see which forms this kernel \
             takes)"
                .into()
        }
        Err(e) => format!("cannot be loaded here: {e}"),
    }
}

#[cfg(not(target_os = "linux"))]
fn kernel_forms() -> String {
    "none (they need Linux)".into()
}

fn long_version() -> &'static str {
    if crate::kernel_programs_built_in() {
        concat!(env!("CARGO_PKG_VERSION"), " (with kernel programs)")
    } else {
        concat!(env!("CARGO_PKG_VERSION"), " (without kernel programs)")
    }
}

/// Parses the command line, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    // clap exits with 2 on usage errors and 0 for --help / --version.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // Before logging: loading the kernel programs to see their forms
    // would log, and this prints to standard output only.
    if let Command::Version(args) = &cli.command {
        return version(args);
    }
    // Before any thread: the services must not inherit systemd's socket,
    // nor (the daemon's) anything else whoever started it left open.
    // `supervise` is a wrapper: what it is handed goes on to its command.
    crate::notify::init();
    if matches!(cli.command, Command::Run(_)) {
        crate::runner::close_inherited_on_exec();
    }
    if let Command::Run(args) = &cli.command
        && args.sample_config
    {
        print!("{}", crate::config::SAMPLE);
        return ExitCode::SUCCESS;
    }
    // The daemon's configuration may choose the log format: read it first.
    let config = match &cli.command {
        Command::Run(args) => match run::load(args) {
            Ok(config) => Some(config),
            Err(e) => {
                // The file's own choice, when it can be made out, covers
                // why the file was refused too.
                init_logging(
                    cli.log_format
                        .or_else(|| run::log_format_of(&args.config))
                        .unwrap_or(LogFormat::Text),
                );
                return report(Err(e));
            }
        },
        _ => None,
    };
    // `status --config FILE` speaks as the daemon it asks does.
    let file_format = match &cli.command {
        Command::Status(args) => args.config.as_deref().and_then(run::log_format_of),
        _ => None,
    };
    let format = cli
        .log_format
        .or(config.as_ref().and_then(|c| c.daemon.log_format))
        .or(file_format)
        .unwrap_or(LogFormat::Text);
    init_logging(format);
    raise_nofile();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return report(Err(CliError::Failed(anyhow::anyhow!(
                "failed to start the async runtime: {e}"
            ))));
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Audit(args) => audit::run(args).await,
            Command::MemCheck(args) => memcheck::run(args),
            Command::Watch(args) => watch::run(args).await,
            Command::Supervise(args) => supervise::run(*args).await,
            Command::Run(args) => match config {
                Some(config) => run::run(args, config).await,
                None => Err(CliError::Usage("no configuration".into())),
            },
            Command::CheckConfig(args) => run::check(&args),
            Command::Status(args) => status::run(args).await,
            Command::Version(_) => Ok(ExitCode::SUCCESS),
        }
    });
    report(result)
}

/// A command line clap refused: its message (exit 2), as one JSON record
/// when the command line asked for JSON logs; help and version as they are.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json");
    if !json
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        e.exit();
    }
    init_logging(LogFormat::Json);
    let text = e.render().to_string();
    report(Err(CliError::Usage(
        text.trim().trim_start_matches("error: ").to_owned(),
    )))
}

/// Turns a command's result into its exit code, printing its error: as a
/// log record (so `--log-format json` covers it too).
fn report(result: Result<ExitCode, CliError>) -> ExitCode {
    let (code, message) = match result {
        Ok(code) => (code, None),
        Err(CliError::Usage(msg)) => (ExitCode::from(2), Some(msg)),
        Err(CliError::Failed(err)) => (ExitCode::FAILURE, Some(format!("{err:#}"))),
    };
    match message {
        Some(message) if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) => {
            tracing::error!("{message}");
            flush_logs();
        }
        Some(message) => {
            // The log's last lines come before the error.
            flush_logs();
            eprintln!("watchdog: error: {message}");
        }
        None => flush_logs(),
    }
    code
}

/// Flushes the log writer's thread when taken (at exit).
static LOG_GUARD: std::sync::OnceLock<
    std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>>,
> = std::sync::OnceLock::new();

/// Flushes what the log writer still holds.
fn flush_logs() {
    if let Some(guard) = LOG_GUARD.get()
        && let Ok(mut guard) = guard.lock()
    {
        guard.take();
    }
}

static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The log writer (its queue and thread), for other records that must
/// neither block nor mix with its lines.
static LOG_WRITER: std::sync::OnceLock<tracing_appender::non_blocking::NonBlocking> =
    std::sync::OnceLock::new();

/// The log writer, once logging is set up.
pub fn log_writer() -> Option<tracing_appender::non_blocking::NonBlocking> {
    LOG_WRITER.get().cloned()
}

/// Log lines dropped because standard error was not read fast enough.
pub fn log_lines_lost() -> u64 {
    LOG_WRITER
        .get()
        .map_or(0, |w| w.error_counter().dropped_lines() as u64)
}

/// Lifts the soft limit on open files to the hard one: watching a thousand
/// processes by pidfd needs more than the usual 1,024.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers; failure leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("WATCHDOG_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Written by a thread of its own: a stalled reader of standard error
    // (a slow journal, a full pipe) costs log lines, never the event loop.
    // Lines dropped that way are counted by the writer, said on exit
    // (`lost_log_lines`) and in the status and metrics.
    // The queue is allocated whole up front: a few thousand lines cover a
    // burst without costing the daemon megabytes while it idles.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(4096)
        .lossy(true)
        .finish(std::io::stderr());
    let _ = LOG_GUARD.set(std::sync::Mutex::new(Some(guard)));
    let _ = LOG_WRITER.set(writer.clone());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            // The services' lines too, each a record of its own.
            crate::output::set(crate::output::ChildOutput::JsonRecords);
            builder.json().init();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn audit_needs_a_scope() {
        let err = Cli::try_parse_from(["watchdog", "audit"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["watchdog", "audit", "--all", "--pid", "1"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["watchdog", "audit", "--pid", "-3"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(Cli::try_parse_from(["watchdog", "audit", "--pid", "1"]).is_ok());
    }
}
