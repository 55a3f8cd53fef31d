//! The kernel matrix of `cargo xtask test`: the privileged integration
//! tests, run again inside QEMU guests booted on Debian's own kernels.
//!
//! Each guest boots a kernel image unpacked from Debian's archive (cached
//! under target/kernels/) with a small initramfs: static busybox, the 9p,
//! virtio and overlay modules, and a generated /init. The init mounts the
//! host's root read-only over 9p under a tmpfs overlay and chroots into it,
//! so the guest runs the host's very release binary and already-built test
//! executables, at the same paths. A second, writable 9p share under
//! target/ carries the output and exit status of each test executable
//! back. Emulated (TCG): hardware virtualisation is not relied on.

use std::{
    collections::BTreeSet,
    env, fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Tally, capture, dpkg_installed, is_root, run};

/// The kernels CI runs (CI=true without `--kernels`).
pub const CI_KERNELS: &str = "6.1,6.12";

/// The kernels `cargo xtask test-kernels` runs by default.
pub const ALL_KERNELS: &str = "6.1,6.12";

/// Debian packages the matrix needs, with a file each one provides.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("kmod", "/sbin/depmod"),
    ("cpio", "/usr/bin/cpio"),
    ("xz-utils", "/usr/bin/xz"),
    ("zstd", "/usr/bin/zstd"),
];

/// What the guest loads before mounting anything; their dependencies come
/// from the kernel's modules.dep, and built-in ones are skipped.
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// A guest that has not powered off by then is killed.
const GUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// One kernel of the matrix, unpacked under target/kernels/.
pub struct Kernel {
    /// The versioned package, e.g. linux-image-6.1.0-56-amd64.
    package: String,
    /// Its `uname -r`.
    pub release: String,
    dir: PathBuf,
}

/// What one guest reported.
pub struct Outcome {
    pub release: String,
    pub tally: Tally,
    pub seconds: u64,
    /// One line per failing test executable, naming the kernel.
    pub failures: Vec<String>,
}

/// The kernels asked for: `--kernels` if given ("none" for none), else
/// [`CI_KERNELS`] under CI=true, else none.
pub fn requested(arg: Option<&str>) -> Vec<String> {
    let ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let list = match arg {
        Some(list) => list,
        None if ci => CI_KERNELS,
        None => return Vec::new(),
    };
    list.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty() && *k != "none")
        .map(str::to_owned)
        .collect()
}

/// Installs the packages the matrix needs (apt-get, as root), or says
/// exactly what to run.
pub fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(package, file)| !Path::new(file).exists() || !dpkg_installed(package))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = PACKAGES.iter().map(|(package, _)| *package).collect();
        println!("kernels: {}: ok", names.join(", "));
        return Ok(());
    }
    let install = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !Path::new("/usr/bin/apt-get").exists() || !is_root() {
        bail!(
            "the kernel matrix needs {} (Debian package names); install them with:\n  \
             sudo apt-get update && sudo {install}\nor skip the matrix with --kernels none",
            missing.join(", ")
        );
    }
    println!("kernels: installing {} with apt-get", missing.join(" "));
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

fn apt(args: &[&str]) -> Result<()> {
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(args))
}

/// The package that holds kernel `version`: its meta package's versioned
/// dependency (`linux-image-amd64` is bookworm's 6.1).
fn resolve_package(version: &str) -> Result<String> {
    let meta = match version {
        "6.1" => "linux-image-amd64".to_owned(),
        v => format!("linux-image-{v}-amd64"),
    };
    let depends = |meta: &str| -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", meta])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends: ")?.trim();
            dep.starts_with("linux-image-").then(|| dep.to_owned())
        })
    };
    if let Some(package) = depends(&meta) {
        return Ok(package);
    }
    if is_root() {
        apt(&["update", "-qq"])?;
        if let Some(package) = depends(&meta) {
            return Ok(package);
        }
    }
    bail!("kernel {version}: apt knows no {meta} depending on a linux-image package")
}

/// Downloads and unpacks kernel `version` under target/kernels/, unless
/// it is there already; generates its modules.dep.
pub fn prepare(root: &Path, version: &str) -> Result<Kernel> {
    let cache = root.join("target/kernels");
    fs::create_dir_all(&cache)?;
    let package = resolve_package(version)?;
    let dir = cache.join(&package);
    let done = dir.join(".unpacked");
    if !done.exists() {
        let deb = find_deb(&cache, &package)?;
        let deb = match deb {
            Some(deb) => deb,
            None => {
                println!("kernels: downloading {package}");
                run(Command::new("apt-get")
                    .current_dir(&cache)
                    .args(["download", "-q", &package]))?;
                find_deb(&cache, &package)?
                    .with_context(|| format!("apt-get download left no {package} .deb"))?
            }
        };
        println!("kernels: unpacking {}", deb.display());
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&dir))?;
        fs::write(&done, "")?;
    }
    let release = fs::read_dir(dir.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .with_context(|| format!("{package} has no lib/modules/<release>"))?;
    let modules = dir.join("lib/modules").join(&release);
    if !modules.join("modules.dep").exists() {
        run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))?;
    }
    Ok(Kernel {
        package,
        release,
        dir,
    })
}

fn find_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    Ok(fs::read_dir(cache)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        }))
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    fn modules_dir(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }

    /// [`MODULES`] and what they need, dependencies first, as paths
    /// relative to the modules directory.
    fn module_order(&self) -> Result<Vec<String>> {
        let dir = self.modules_dir();
        let dep = fs::read_to_string(dir.join("modules.dep"))?;
        let builtin = fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let name_of = |path: &str| -> String {
            let file = path.rsplit('/').next().unwrap_or(path);
            file.split(".ko").next().unwrap_or(file).replace('-', "_")
        };
        let deps: Vec<(String, String, Vec<String>)> = dep
            .lines()
            .filter_map(|l| {
                let (module, needs) = l.split_once(':')?;
                Some((
                    name_of(module),
                    module.to_owned(),
                    needs.split_whitespace().map(str::to_owned).collect(),
                ))
            })
            .collect();
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for wanted in MODULES {
            let Some((_, path, needs)) = deps.iter().find(|(n, _, _)| n == wanted) else {
                if builtin.lines().any(|l| name_of(l) == *wanted) {
                    continue;
                }
                bail!("kernel {}: no module {wanted}", self.release);
            };
            // modules.dep lists every dependency, deepest last.
            for p in needs.iter().rev().chain([path]) {
                if seen.insert(p.clone()) {
                    order.push(p.clone());
                }
            }
        }
        Ok(order)
    }

    /// Builds target/kernels/<package>/initramfs.cpio: busybox, the
    /// modules (decompressed), and /init.
    fn initramfs(&self, init: &str) -> Result<PathBuf> {
        let stage = self.dir.join("initramfs");
        if stage.exists() {
            fs::remove_dir_all(&stage)?;
        }
        for d in [
            "bin", "modules", "proc", "sys", "dev", "lower", "upper", "newroot",
        ] {
            fs::create_dir_all(stage.join(d))?;
        }
        fs::copy("/bin/busybox", stage.join("bin/busybox"))?;
        let mut names = Vec::new();
        for (i, module) in self.module_order()?.iter().enumerate() {
            let source = self.modules_dir().join(module);
            let name = format!(
                "{i:02}-{}.ko",
                module
                    .rsplit('/')
                    .next()
                    .unwrap_or(module)
                    .split(".ko")
                    .next()
                    .unwrap_or(module)
            );
            let target = stage.join("modules").join(&name);
            if module.ends_with(".xz") {
                let out = Command::new("xz")
                    .args(["-dc"])
                    .arg(&source)
                    .output()
                    .context("failed to run xz")?;
                if !out.status.success() {
                    bail!("xz -d {} failed", source.display());
                }
                fs::write(&target, out.stdout)?;
            } else if module.ends_with(".zst") {
                let out = Command::new("zstd")
                    .args(["-dc"])
                    .arg(&source)
                    .output()
                    .context("failed to run zstd")?;
                if !out.status.success() {
                    bail!("zstd -d {} failed", source.display());
                }
                fs::write(&target, out.stdout)?;
            } else {
                fs::copy(&source, &target)?;
            }
            names.push(name);
        }
        fs::write(stage.join("init"), init)?;
        fs::set_permissions(stage.join("init"), fs::Permissions::from_mode(0o755))?;
        let image = self.dir.join("initramfs.cpio");
        let files = capture(Command::new("find").arg(".").current_dir(&stage))?;
        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(&stage)
            .stdin(Stdio::piped())
            .stdout(fs::File::create(&image)?)
            .spawn()
            .context("failed to run cpio")?;
        cpio.stdin
            .take()
            .context("piped stdin")?
            .write_all(files.as_bytes())?;
        if !cpio.wait()?.success() {
            bail!("cpio failed to write {}", image.display());
        }
        Ok(image)
    }
}

/// Everything a guest needs to run the tests as the host does.
pub struct Suite<'a> {
    pub root: &'a Path,
    /// The test executables, by name (audit, daemon, ...).
    pub tests: &'a [(String, PathBuf)],
    /// Where the executables run (cargo runs them in their package).
    pub cwd: PathBuf,
    /// The environment the tests get, besides HOME, PATH and CI.
    pub env: Vec<(String, String)>,
}

/// Lines of a guest's console that say its kernel is broken: it is
/// killed at once rather than left to the timeout.
const BROKEN: &[&str] = &["Oops: ", "Kernel panic", "general protection fault"];

/// Lines that say a CPU has made no progress for 20 s or more: a guest
/// only starved of its host's CPU for a while can print one, so it is
/// killed once they repeat.
const STUCK: &[&str] = &[
    "BUG: soft lockup",
    "self-detected stall on CPU",
    "detected stalls on CPUs",
];

/// How many [`STUCK`] lines make a guest broken.
const STUCK_LINES: usize = 3;

/// Why a guest ended early.
#[derive(Debug)]
struct Broken {
    release: String,
    /// The console line that told.
    line: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kernel {}: the guest kernel broke: {}",
            self.release, self.line
        )
    }
}

impl std::error::Error for Broken {}

/// Boots `kernel` and runs the suite in it. A guest whose kernel broke
/// (an oops, a soft lockup, an RCU stall: emulated SMP does not always see
/// code patched on one vCPU finished on the other) is killed as soon as
/// its console says so and booted once more, saying so, to run the test
/// executables that had not finished; any other failure stands, and so
/// does a second break.
pub fn run_guest(kernel: &Kernel, suite: &Suite) -> Result<Outcome> {
    let results = suite
        .root
        .join("target/kernels/results")
        .join(&kernel.release);
    if results.exists() {
        fs::remove_dir_all(&results)?;
    }
    fs::create_dir_all(&results)?;
    let started = Instant::now();
    let first = run_guest_once(kernel, suite, &results);
    let outcome = match first {
        Err(e) if e.downcast_ref::<Broken>().is_some() => {
            let console = results.join("console.log");
            let saved = results.join("console-broken.log");
            fs::rename(&console, &saved)?;
            println!(
                "{e:#} (console kept in {}); booting it once more for the test executables \
                 that had not finished",
                saved.display()
            );
            run_guest_once(kernel, suite, &results)
        }
        other => other,
    }?;
    Ok(Outcome {
        seconds: started.elapsed().as_secs(),
        ..outcome
    })
}

/// One boot: the test executables without an exit status in `results`
/// run, and add theirs.
fn run_guest_once(kernel: &Kernel, suite: &Suite, results: &Path) -> Result<Outcome> {
    let started = Instant::now();
    fs::write(results.join("run.sh"), guest_script(suite, results))?;
    let image = kernel.initramfs(&init_script(results))?;

    println!(
        "kernels: booting {} ({}) under QEMU (emulated)",
        kernel.release, kernel.package
    );
    // One host thread runs both vCPUs in turn: code one vCPU patches
    // (static keys flipped as programs attach and detach) is then always
    // seen finished by the other, which multi-threaded emulation does not
    // promise (int3 oopses, soft lockups). The guests run side by side.
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "3G",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(&image)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init",
        ])
        .args([
            "-fsdev",
            // The host's root spans several file systems (/proc, /sys, ...)
            // whose inode numbers collide unless remapped.
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        ])
        .arg("-fsdev")
        .arg(format!(
            "local,id=results,path={},security_model=none",
            results.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=results,mount_tag=results"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start qemu-system-x86_64")?;
    let stdout = qemu.stdout.take().context("piped stdout")?;
    let stderr = qemu.stderr.take().context("piped stderr")?;
    let console = results.join("console.log");
    let mut log = fs::File::create(&console)?;
    let label = kernel.release.clone();
    let broken = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let told = broken.clone();
    let reader = thread::spawn(move || {
        let mut stuck = 0;
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\r');
            let _ = writeln!(log, "{line}");
            println!("[{label}] {line}");
            if STUCK.iter().any(|b| line.contains(b)) {
                stuck += 1;
            }
            if BROKEN.iter().any(|b| line.contains(b)) || stuck >= STUCK_LINES {
                told.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(|| line.trim().to_owned());
            }
        }
    });
    let errors = thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let deadline = started + GUEST_TIMEOUT;
    let broke = || broken.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let status = loop {
        if let Some(status) = qemu.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline || broke().is_some() {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let _ = reader.join();
    let qemu_errors = errors.join().unwrap_or_default();
    let seconds = started.elapsed().as_secs();
    if let Some(line) = broke() {
        return Err(Broken {
            release: kernel.release.clone(),
            line,
        }
        .into());
    }
    let Some(status) = status else {
        bail!(
            "kernel {}: the guest did not finish within {} s and was killed (console: {})",
            kernel.release,
            GUEST_TIMEOUT.as_secs(),
            console.display()
        );
    };
    if !status.success() {
        bail!(
            "kernel {}: qemu failed with {status}: {}",
            kernel.release,
            qemu_errors.trim()
        );
    }
    if !results.join("done").exists() {
        bail!(
            "kernel {}: the guest stopped before the tests finished (console: {})",
            kernel.release,
            console.display()
        );
    }
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for (name, _) in suite.tests {
        let output = fs::read_to_string(results.join(format!("{name}.out"))).unwrap_or_default();
        for line in output.lines() {
            tally.add(line);
        }
        let code = fs::read_to_string(results.join(format!("{name}.rc")))
            .map(|c| c.trim().to_owned())
            .unwrap_or_else(|_| "none".to_owned());
        if code != "0" {
            let failed: Vec<&str> = output
                .lines()
                .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
                .collect();
            failures.push(format!(
                "kernel {}: {name} failed (exit status {code}){}",
                kernel.release,
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", failed.join(", "))
                }
            ));
        }
    }
    Ok(Outcome {
        release: kernel.release.clone(),
        tally,
        seconds,
        failures,
    })
}

/// The guest's /init (busybox sh): modules, mounts, chroot into the
/// host's root, the tests, power off.
fn init_script(results: &Path) -> String {
    let results = results.display();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
stop() {{ echo "guest: $*"; poweroff -f; }}
for m in /modules/*.ko; do
    insmod "$m" || stop "insmod $m failed"
done
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower \
    || stop "cannot mount the host's root"
# Every directory is writable through the overlay's upper layer, /tmp and
# /run included: no tmpfs is mounted over them, since the checkout (its
# test executables, the results share) may well live under /tmp.
mount -t tmpfs -o size=2G tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work /newroot \
    || stop "cannot mount the overlay"
R=/newroot{results}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "$R" \
    || stop "cannot mount the results share"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tracefs tracefs /newroot/sys/kernel/tracing
mount -t debugfs debugfs /newroot/sys/kernel/debug
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || stop "cannot mount cgroup2"
echo "+memory +pids" > /newroot/sys/fs/cgroup/cgroup.subtree_control
ip link set lo up
echo "guest: $(uname -r) up, running the tests"
chroot /newroot /bin/sh {results}/run.sh
sync
poweroff -f
"#
    )
}

/// What runs inside the chroot: each test executable, its output into
/// the results share (and the console), its exit status beside it.
fn guest_script(suite: &Suite, results: &Path) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut script = String::from("set -u\nexport HOME=/root CI=true\n");
    let path = env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    script += &format!("export PATH={}\n", quote(&path));
    for (k, v) in &suite.env {
        script += &format!("export {k}={}\n", quote(v));
    }
    script += &format!("cd {}\n", quote(&suite.cwd.display().to_string()));
    let r = quote(&results.display().to_string());
    for (name, exe) in suite.tests {
        if results.join(format!("{name}.rc")).exists() {
            continue;
        }
        script += &format!(
            "echo \"     Running {name} ($(uname -r))\"\n\
             {{ {exe}; echo $? > {r}/{name}.rc; }} 2>&1 | tee {r}/{name}.out\n",
            exe = quote(&exe.display().to_string()),
        );
    }
    script += &format!("sync\necho done > {r}/done\nsync\n");
    script
}
