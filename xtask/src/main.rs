//! Project tasks. `cargo xtask setup | build-ebpf | build | run | test | bench`.
//!
//! These are the only commands a newcomer needs: `setup` installs whatever
//! is missing (idempotently, saying what it does), and `run` and `test` run
//! it first, so a fresh machine needs nothing done by hand. `run` without
//! arguments shows the daemon at work on examples/watchdog.toml.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    os::unix::process::{CommandExt, ExitStatusExt},
    path::{Path, PathBuf},
    process::{self, Command},
    sync::atomic::{AtomicI32, Ordering},
    time::Instant,
};

use anyhow::{Context, Result, bail};

mod bench;
mod kernels;
use clap::{Parser, Subcommand};

/// LLVM major version of the pinned nightly, which bpf-linker must match.
const LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
];
const APPLE_TARGETS: &[&str] = &["aarch64-apple-darwin", "x86_64-apple-darwin"];
const EBPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "watchdog project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: the pinned nightly with rust-src, LLVM 22,
    /// bpf-linker, the apple-darwin targets. Safe to run again.
    Setup,
    /// Build the kernel programs.
    BuildEbpf,
    /// Build the release binary with the kernel programs embedded.
    Build,
    /// Set up if needed, build, and run the binary as root (via `sudo -E`
    /// when not root). Without arguments: the demo.
    ///
    /// `cargo xtask run -- ARGS` runs `watchdog ARGS`. Without arguments,
    /// the demo: `watchdog run --config examples/watchdog.toml` from the
    /// repository root, supervising two `watchdog-demo` workers (one leaks
    /// and is drained and restarted each time it crosses its limit, one
    /// stays under it), and watching a `watchdog-demo session` started
    /// alongside, which it must not stop: it leaves a marker for it. The
    /// audit log and the marker are under target/demo. Ctrl-C stops
    /// everything; xtask exits with the daemon's status.
    Run {
        /// Arguments for the watchdog binary.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up if needed, build, then fmt, clippy, unit and integration
    /// tests (privileged ones included when root), and the macOS check;
    /// then the privileged tests again on each of `--kernels`, in QEMU.
    Test {
        /// Debian kernels to run the privileged integration tests on, in
        /// QEMU guests, after the host's suite: e.g. `6.1,6.12`, or `none`.
        /// Default: 6.1 under CI=true (see kernels::CI_KERNELS), none
        /// otherwise.
        #[arg(long, value_name = "LIST")]
        kernels: Option<String>,
    },
    /// Build, then run only the kernel matrix of `test`: the privileged
    /// integration tests in QEMU guests on each of `--kernels`.
    TestKernels {
        /// Debian kernels, e.g. `6.1,6.12` (the default).
        #[arg(long, value_name = "LIST", default_value = kernels::ALL_KERNELS)]
        kernels: String,
    },
    /// Measure the kernel programs' cost to the host (interleaved pairs),
    /// detection latency, overshoot, exit storms, idle CPU and memory
    /// against same-run baselines; write BENCHMARKS.md. Needs root.
    Bench {
        /// A reduced set (fewer pairs, runs and shorter windows), for
        /// development: under 2 minutes. Writes target/BENCHMARKS.quick.md.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let project = Project::locate()?;
    match cli.command {
        Task::Setup => project.setup(),
        Task::BuildEbpf => project.build_ebpf().map(drop),
        Task::Build => project.build().map(drop),
        Task::Run { args } => project.run(args),
        Task::Test { kernels } => project.test(kernels.as_deref()),
        Task::TestKernels { kernels } => project.test_kernels(&kernels),
        Task::Bench { quick } => bench::bench(&project, quick),
    }
}

struct Project {
    root: PathBuf,
    /// The nightly the kernel programs build with, from their
    /// rust-toolchain.toml (one source of truth).
    nightly: String,
}

impl Project {
    fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask lives in the workspace")?
            .to_path_buf();
        let toolchain_file = root.join("watchdog-ebpf/rust-toolchain.toml");
        let text = fs::read_to_string(&toolchain_file)
            .with_context(|| format!("failed to read {}", toolchain_file.display()))?;
        let nightly = text
            .lines()
            .find_map(|l| {
                let value = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
                Some(value.trim().trim_matches('"').to_owned())
            })
            .with_context(|| format!("no channel in {}", toolchain_file.display()))?;
        Ok(Self { root, nightly })
    }

    fn ebpf_dir(&self) -> PathBuf {
        self.root.join("watchdog-ebpf")
    }

    fn ebpf_object(&self) -> PathBuf {
        self.root
            .join("target/ebpf")
            .join(EBPF_TARGET)
            .join("release/watchdog-ebpf")
    }

    fn binary(&self) -> PathBuf {
        self.root.join("target/release/watchdog")
    }

    // ---- setup -------------------------------------------------------

    fn setup(&self) -> Result<()> {
        let started = Instant::now();
        self.setup_nightly()?;
        self.setup_host_components()?;
        setup_llvm()?;
        setup_bpf_linker()?;
        let elapsed = started.elapsed().as_secs_f32();
        println!("setup: everything is in place ({elapsed:.1} s)");
        Ok(())
    }

    fn setup_nightly(&self) -> Result<()> {
        let tc = &self.nightly;
        let installed = Command::new("rustup")
            .args(["run", tc, "rustc", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            println!("setup: installing toolchain {tc} for the kernel programs");
            run(Command::new("rustup").args(["toolchain", "install", tc, "--profile", "minimal"]))?;
        }
        // rustup does not add a rust-toolchain.toml's components to a
        // toolchain that is already installed, so add them explicitly.
        let components = installed_components(Some(tc))?;
        for component in ["rust-src", "clippy"] {
            if components.iter().any(|c| c.starts_with(component)) {
                continue;
            }
            println!("setup: adding {component} to {tc}");
            run(Command::new("rustup").args(["component", "add", component, "--toolchain", tc]))?;
        }
        println!("setup: toolchain {tc} with rust-src: ok");
        Ok(())
    }

    fn setup_host_components(&self) -> Result<()> {
        let components = installed_components(None)?;
        for component in ["rustfmt", "clippy"] {
            if !components.iter().any(|c| c.starts_with(component)) {
                println!("setup: adding {component} to the default toolchain");
                run(Command::new("rustup").current_dir(&self.root).args([
                    "component",
                    "add",
                    component,
                ]))?;
            }
        }
        let targets = capture(Command::new("rustup").current_dir(&self.root).args([
            "target",
            "list",
            "--installed",
        ]))?;
        for target in APPLE_TARGETS {
            if !targets.lines().any(|t| t.trim() == *target) {
                println!("setup: adding target {target} (for the macOS build check)");
                run(Command::new("rustup")
                    .current_dir(&self.root)
                    .args(["target", "add", target]))?;
            }
        }
        println!("setup: default toolchain with rustfmt, clippy, apple-darwin targets: ok");
        Ok(())
    }

    // ---- build -------------------------------------------------------

    fn build_ebpf(&self) -> Result<PathBuf> {
        let mut cmd = Command::new("cargo");
        cmd.arg(format!("+{}", self.nightly))
            .args(["build", "--release", "--target-dir"])
            .arg(self.root.join("target/ebpf"))
            .current_dir(self.ebpf_dir());
        clean_toolchain_env(&mut cmd);
        run(&mut cmd).context("failed to build the kernel programs (try `cargo xtask setup`)")?;
        let object = self.ebpf_object();
        if !object.is_file() {
            bail!("the kernel build did not produce {}", object.display());
        }
        Ok(object)
    }

    fn build(&self) -> Result<PathBuf> {
        let object = self.build_ebpf()?;
        run(Command::new("cargo")
            .current_dir(&self.root)
            .env("WATCHDOG_EBPF_OBJECT", &object)
            .args(["build", "--release", "--package", "watchdog"]))?;
        let binary = self.binary();
        let embedded = capture(Command::new(&binary).arg("--version"))?;
        if !embedded.contains("with kernel programs") {
            bail!(
                "{} was built without its kernel programs ({})",
                binary.display(),
                embedded.trim()
            );
        }
        Ok(binary)
    }

    // ---- run ---------------------------------------------------------

    fn run(&self, args: Vec<OsString>) -> Result<()> {
        self.setup()?;
        let binary = self.build()?;
        if args.is_empty() {
            return self.demo(&binary);
        }
        let err = as_root(&binary, None).args(&args).exec();
        Err(err).with_context(|| format!("failed to run {}", binary.display()))
    }

    /// The daemon on examples/watchdog.toml, from the repository root (the
    /// configuration's relative paths are taken from there), with a
    /// long-lived session of its own to watch: a process it did not start.
    /// Exits with the daemon's status, leaving nothing behind.
    fn demo(&self, watchdog: &Path) -> Result<()> {
        run(Command::new("cargo").current_dir(&self.root).args([
            "build",
            "--release",
            "--package",
            "watchdog-demo",
        ]))?;
        let release = self.root.join("target/release");
        fs::create_dir_all(self.root.join("target/demo"))?;
        // The configuration names its programs without a path.
        let mut path = vec![release.clone()];
        path.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        let path = env::join_paths(path)?;

        step("demo: watchdog run --config examples/watchdog.toml");
        println!(
            "The daemon supervises the workers in examples/watchdog.toml (one leaks: it is\n\
             drained and restarted each time it crosses its limit; one stays under it) and\n\
             watches `watchdog-demo session`, started here, which it must not stop.\n\
             Audit log (JSON lines): target/demo/audit.jsonl\n\
             Marker, once the session crosses its limit: \
             target/demo/state/respawn-recommended/session\n\
             From another terminal, in this directory (as root, like the daemon):\n  \
             target/release/watchdog status --config examples/watchdog.toml\n  \
             curl -s http://127.0.0.1:9731/metrics | grep restarts\n\
             Ctrl-C stops everything."
        );
        let mut session = Command::new(release.join("watchdog-demo"))
            .args(["session", "--grow-to", "96MiB", "--over", "6s"])
            .current_dir(&self.root)
            .spawn()
            .context("failed to start the demo session")?;
        let status = as_root(watchdog, Some(&path))
            .args(["run", "--config", "examples/watchdog.toml"])
            .current_dir(&self.root)
            .spawn()
            .and_then(|mut daemon| {
                forward_stop_signals_to(daemon.id());
                let status = daemon.wait();
                DAEMON.store(0, Ordering::SeqCst);
                status
            });
        // The session ends with the daemon, whatever became of it.
        session.kill()?;
        session.wait()?;
        let status = status.with_context(|| format!("failed to run {}", watchdog.display()))?;
        if status.success() {
            return Ok(());
        }
        process::exit(
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        )
    }

    // ---- test --------------------------------------------------------

    fn test(&self, kernels: Option<&str>) -> Result<()> {
        let started = Instant::now();
        self.setup()?;
        // The kernel matrix's tools and images first: a missing one fails
        // now, not after the host's suite.
        let kernels = kernels::requested(kernels);
        let mut images = Vec::new();
        if !kernels.is_empty() {
            kernels::setup()?;
            for version in &kernels {
                images.push(kernels::prepare(&self.root, version)?);
            }
        }
        let binary = self.build()?;
        let object = self.ebpf_object();

        step("cargo fmt --check");
        run(Command::new("cargo")
            .current_dir(&self.root)
            .args(["fmt", "--all", "--check"]))?;
        // The kernel crate is its own workspace; check it with the same
        // rustfmt (its pinned nightly carries no rustfmt).
        run(Command::new("rustfmt")
            .current_dir(&self.root)
            .args(["--edition", "2024", "--check"])
            .arg(self.ebpf_dir().join("src/main.rs")))?;

        step("clippy (warnings denied)");
        run(Command::new("cargo")
            .current_dir(&self.root)
            .env("WATCHDOG_EBPF_OBJECT", &object)
            .args([
                "clippy",
                "--release",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
        let mut ebpf_clippy = Command::new("cargo");
        ebpf_clippy
            .arg(format!("+{}", self.nightly))
            .args(["clippy", "--release", "--target-dir"])
            .arg(self.root.join("target/ebpf"))
            .args(["--", "-D", "warnings"])
            .current_dir(self.ebpf_dir());
        clean_toolchain_env(&mut ebpf_clippy);
        run(&mut ebpf_clippy)?;

        step("unit and integration tests");
        if is_root() {
            println!("test: root, so the privileged (eBPF) tests run");
        } else {
            println!("test: not root, so the privileged (eBPF) tests skip with a reason");
        }
        let tally = run_tests(
            Command::new("cargo")
                .current_dir(&self.root)
                .env("WATCHDOG_EBPF_OBJECT", &object)
                .env("WATCHDOG_BIN", &binary)
                .args(["test", "--release", "--workspace"]),
        )?;

        step("macOS build check (clippy, warnings denied)");
        for target in APPLE_TARGETS {
            run(Command::new("cargo").current_dir(&self.root).args([
                "clippy",
                "--package",
                "watchdog",
                "--target",
                target,
                "--",
                "-D",
                "warnings",
            ]))?;
        }
        let outcomes = if images.is_empty() {
            Vec::new()
        } else {
            self.kernel_matrix(&images, &binary)?
        };

        let elapsed = started.elapsed().as_secs();
        println!("\nxtask test: every step passed in {elapsed} s");
        // The closing line, in the plain form log readers look for.
        let skipped = match tally.ignored {
            0 => String::new(),
            n => format!(", {n} skipped"),
        };
        println!(
            "tests: {} passed, {} failed{skipped}",
            tally.passed, tally.failed
        );
        if !outcomes.is_empty() {
            let each: Vec<String> = outcomes
                .iter()
                .map(|o| format!("{} {} passed", o.release, o.tally.passed))
                .collect();
            println!("kernels: {}", each.join(", "));
        }
        Ok(())
    }

    fn test_kernels(&self, kernels: &str) -> Result<()> {
        let started = Instant::now();
        self.setup()?;
        kernels::setup()?;
        let images = kernels::requested(Some(kernels))
            .iter()
            .map(|version| kernels::prepare(&self.root, version))
            .collect::<Result<Vec<_>>>()?;
        let binary = self.build()?;
        let outcomes = self.kernel_matrix(&images, &binary)?;
        let each: Vec<String> = outcomes
            .iter()
            .map(|o| format!("{} {} passed", o.release, o.tally.passed))
            .collect();
        println!(
            "\nxtask test-kernels: passed in {} s\nkernels: {}",
            started.elapsed().as_secs(),
            each.join(", ")
        );
        Ok(())
    }

    /// The privileged integration tests again, on each kernel in a QEMU
    /// guest: the same release binary and the same test executables.
    fn kernel_matrix(
        &self,
        images: &[kernels::Kernel],
        binary: &Path,
    ) -> Result<Vec<kernels::Outcome>> {
        let object = self.ebpf_object();
        step("privileged integration tests on other kernels (QEMU)");
        let tests = self.test_executables(&object)?;
        let names: Vec<&str> = tests.iter().map(|(n, _)| n.as_str()).collect();
        println!("kernels: test executables: {}", names.join(", "));
        let suite = kernels::Suite {
            root: &self.root,
            tests: &tests,
            cwd: self.root.join("tests"),
            env: vec![
                ("WATCHDOG_BIN".into(), binary.display().to_string()),
                ("WATCHDOG_EBPF_OBJECT".into(), object.display().to_string()),
                ("RUST_BACKTRACE".into(), "1".into()),
                // One test at a time: an emulated guest is several times
                // slower than the host, and tests that wait on daemons
                // racing each other for its two vCPUs only lose margin.
                ("RUST_TEST_THREADS".into(), "1".into()),
            ],
        };
        let mut outcomes = Vec::new();
        let mut failures = Vec::new();
        // The guests side by side: each emulates its vCPUs on one host
        // thread, so together they keep this machine's CPUs busy.
        let results: Vec<Result<kernels::Outcome>> = std::thread::scope(|scope| {
            let guests: Vec<_> = images
                .iter()
                .map(|kernel| scope.spawn(|| kernels::run_guest(kernel, &suite)))
                .collect();
            guests
                .into_iter()
                .map(|guest| {
                    guest
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a guest's thread panicked")))
                })
                .collect()
        });
        for result in results {
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(e) => {
                    // Already names the kernel; the others still count.
                    println!("{e:#}");
                    failures.push(format!("{e:#}"));
                    continue;
                }
            };
            failures.extend(outcome.failures.iter().cloned());
            outcomes.push(outcome);
        }
        println!();
        for outcome in &outcomes {
            println!(
                "kernel {}: {} passed, {} failed ({} s)",
                outcome.release, outcome.tally.passed, outcome.tally.failed, outcome.seconds
            );
        }
        if !failures.is_empty() {
            for line in &failures {
                println!("{line}");
            }
            bail!("{}", failures.join("; "));
        }
        Ok(outcomes)
    }

    /// The integration test executables cargo built for the host's run:
    /// the same command and environment, so nothing is rebuilt (a build
    /// of the package alone would unify features differently).
    fn test_executables(&self, object: &Path) -> Result<Vec<(String, PathBuf)>> {
        let out = capture(
            Command::new("cargo")
                .current_dir(&self.root)
                .env("WATCHDOG_EBPF_OBJECT", object)
                .env("WATCHDOG_BIN", self.binary())
                .args([
                    "test",
                    "--release",
                    "--workspace",
                    "--no-run",
                    "--message-format=json",
                ]),
        )?;
        let manifest = self.root.join("tests/Cargo.toml").display().to_string();
        let mut tests = Vec::new();
        for line in out.lines() {
            let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if message["reason"] != "compiler-artifact"
                || message["profile"]["test"] != true
                || message["manifest_path"].as_str() != Some(&*manifest)
                || message["target"]["kind"][0] != "test"
            {
                continue;
            }
            let (Some(name), Some(exe)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            ) else {
                continue;
            };
            tests.push((name.to_owned(), PathBuf::from(exe)));
        }
        if tests.is_empty() {
            bail!("cargo test --no-run listed no test executables for watchdog-tests");
        }
        tests.sort();
        Ok(tests)
    }
}

fn setup_llvm() -> Result<()> {
    let llvm_config = PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}/bin/llvm-config"));
    let missing: Vec<&str> = LLVM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() && llvm_config.is_file() {
        println!("setup: LLVM {LLVM_MAJOR} development packages: ok");
        return Ok(());
    }
    let has_apt = Path::new("/usr/bin/apt-get").exists();
    let install = format!("apt-get install -y {}", LLVM_PACKAGES.join(" "));
    if !has_apt {
        bail!(
            "LLVM {LLVM_MAJOR} (with llvm-config at {}) is needed to build bpf-linker; \
             install it with your package manager",
            llvm_config.display()
        );
    }
    if !is_root() {
        bail!(
            "LLVM {LLVM_MAJOR} development packages are missing ({}); install them with:\n  \
             sudo apt-get update && sudo {install}\nthen run `cargo xtask setup` again",
            missing.join(", ")
        );
    }
    println!("setup: installing {} with apt-get", missing.join(" "));
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(LLVM_PACKAGES))?;
    if !llvm_config.is_file() {
        bail!(
            "apt-get installed LLVM but {} is missing",
            llvm_config.display()
        );
    }
    Ok(())
}

fn setup_bpf_linker() -> Result<()> {
    let feature = format!("llvm-{LLVM_MAJOR}");
    let version = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let right_version = version
        .as_deref()
        .is_some_and(|v| v.split_whitespace().last() == Some(BPF_LINKER_VERSION));
    if right_version && bpf_linker_features().is_some_and(|f| f.contains(&feature)) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} ({feature}): ok");
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} \
         (found: {}; takes about a minute)",
        version.as_deref().unwrap_or("none")
    );
    let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from(&prefix).join("bin")];
    paths.extend(env::split_paths(&path));
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "bpf-linker", "--force", "--version"])
        .arg(BPF_LINKER_VERSION)
        .args(["--no-default-features", "--features", &feature])
        .env("PATH", env::join_paths(paths)?)
        // Without these it finds the system's default llvm-config instead.
        .env(format!("LLVM_SYS_{LLVM_MAJOR}1_PREFIX"), &prefix)
        .env("LLVM_PREFIX", &prefix);
    clean_toolchain_env(&mut cmd);
    run(&mut cmd).context("failed to build bpf-linker")
}

/// The features bpf-linker was installed with, from cargo's install record.
fn bpf_linker_features() -> Option<Vec<String>> {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let text = fs::read_to_string(home.join(".crates2.json")).ok()?;
    // {"installs":{"bpf-linker 0.13.0 (registry+...)":{..."features":["llvm-22"],...}}}
    let start = text.find(&format!("\"bpf-linker {BPF_LINKER_VERSION} "))?;
    let rest = &text[start..];
    let features = rest.find("\"features\":[")? + "\"features\":[".len();
    let end = rest[features..].find(']')? + features;
    Some(
        rest[features..end]
            .split(',')
            .map(|f| f.trim().trim_matches('"').to_owned())
            .collect(),
    )
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
}

fn installed_components(toolchain: Option<&str>) -> Result<Vec<String>> {
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "list", "--installed"]);
    if let Some(tc) = toolchain {
        cmd.args(["--toolchain", tc]);
    }
    Ok(capture(&mut cmd)?.lines().map(str::to_owned).collect())
}

/// Removes what cargo sets for xtask itself, so that a nested cargo picks
/// its own toolchain and flags.
fn clean_toolchain_env(cmd: &mut Command) {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
}

/// `program` as root: itself when xtask runs as root, else through
/// `sudo -E`. `path`, when given, becomes its PATH: through env(1) under
/// sudo, whose secure_path would replace it otherwise.
fn as_root(program: &Path, path: Option<&OsStr>) -> Command {
    if is_root() {
        let mut cmd = Command::new(program);
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        return cmd;
    }
    println!("run: not root, running through `sudo -E`");
    let mut cmd = Command::new("sudo");
    cmd.arg("-E");
    if let Some(path) = path {
        let mut assignment = OsString::from("PATH=");
        assignment.push(path);
        cmd.arg("env").arg(assignment);
    }
    cmd.arg(program);
    cmd
}

/// The daemon `cargo xtask run` waits for, while it runs.
static DAEMON: AtomicI32 = AtomicI32::new(0);

/// Passes SIGINT and SIGTERM sent to xtask on to the daemon, instead of
/// dying of them: xtask outlives the daemon and cleans up after it. Ctrl-C
/// in the terminal is the exception: it reaches the daemon without help.
fn forward_stop_signals_to(pid: u32) {
    DAEMON.store(pid as i32, Ordering::SeqCst);
    let handler = forward as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);
    // SAFETY: a zeroed sigaction is valid (no flags, empty mask).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only reads an atomic and calls kill(2), both
        // async-signal-safe.
        unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
    }
}

extern "C" fn forward(signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Ctrl-C in the terminal (sent by the kernel) goes to the daemon
    // directly, or through sudo: forwarding it as well would make one
    // Ctrl-C two.
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    if unsafe { (*info).si_code } == libc::SI_KERNEL {
        return;
    }
    let pid = DAEMON.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) has no memory effects; the pid is cleared as soon
        // as the daemon is reaped.
        unsafe { libc::kill(pid, signal) };
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn step(name: &str) {
    println!("\n==> {name}");
}

/// Totals over every test binary of a `cargo test` run.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Counts a `test result:` line; other lines are ignored.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let n: u64 = n.parse().unwrap_or(0);
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test`, passing its output through, and adds up the
/// `test result:` lines of every test binary.
/// A process a test left behind can hold the output open after cargo
/// exits: its end is not waited for longer than this.
const LEFTOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn run_tests(cmd: &mut Command) -> Result<Tally> {
    use std::{
        io::{BufRead, BufReader},
        sync::mpsc,
        time::{Duration, Instant},
    };
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    let mut tally = Tally::default();
    let stdout = child.stdout.take().context("piped stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut exited = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                println!("{line}");
                tally.add(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if exited.is_none() {
            exited = child.try_wait()?.map(|status| (status, Instant::now()));
        }
        if exited.is_some_and(|(_, at)| at.elapsed() > LEFTOVER_WAIT) {
            println!(
                "xtask: cargo exited {} s ago but processes the tests left behind still hold \
                 its output; not waiting for them",
                LEFTOVER_WAIT.as_secs()
            );
            break;
        }
    }
    let status = match exited {
        Some((status, _)) => status,
        None => child.wait()?,
    };
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(tally)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
