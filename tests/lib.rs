//! Helpers for the end-to-end tests: locating binaries, a private bus, fasad and its clients as
//! child processes that are killed when dropped.
//!
//! The binaries are the release builds in the workspace's target folder
//! (`cargo build --release -p fasad -p fasactl` first; `$CARGO_TARGET_DIR` is honoured).
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a client command may run before the test calls it hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long fasad may take to load the model and claim its name.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// `target/release` of this workspace.
pub fn release_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"));
    target.join("release")
}

/// Path of a release binary of the workspace; panics with the command to build it.
pub fn binary(name: &str) -> PathBuf {
    let path = release_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first with `cargo build --release -p fasad -p fasactl`",
        path.display()
    );
    path
}

/// A private `dbus-daemon` (session type, this user only), stopped when dropped.
pub struct TestBus {
    child: Child,
    /// `unix:path=…`, for `DBUS_SESSION_BUS_ADDRESS`, `gdbus --address`, `busctl --address`.
    pub address: String,
    dir: TempDir,
}

impl TestBus {
    pub fn start() -> TestBus {
        let dir = tempfile::Builder::new().prefix("fasa-bus-").tempdir().expect("temporary folder");
        let socket = dir.path().join("bus");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("write bus config");
        let child = Command::new("dbus-daemon")
            .arg("--nofork")
            .arg(format!("--config-file={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // It complains on stderr when it may not raise its fd limit; keep that for errors.
            .stderr(File::create(dir.path().join("bus.stderr")).expect("bus stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dbus-daemon ({e}): install the `dbus` package"));
        let mut bus = TestBus { child, address: format!("unix:path={}", socket.display()), dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = bus.child.try_wait() {
                let log = std::fs::read_to_string(bus.dir.path().join("bus.stderr")).unwrap_or_default();
                panic!("dbus-daemon exited at start ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "dbus-daemon did not create {} within 10 s", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        bus
    }

    /// A scratch folder that lives as long as the bus.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A command whose session bus is this one (and with no system bus to fall back on).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env("DBUS_SYSTEM_BUS_ADDRESS", format!("unix:path={}", self.dir.path().join("no-system-bus").display()))
            // fasad's state folder (calibration profiles) lives and dies with the bus.
            .env("STATE_DIRECTORY", self.dir.path().join("state"))
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `fasactl ARGS` against this bus.
    pub fn fasactl(&self, args: &[&str]) -> Output {
        run(self.command(binary("fasactl")).args(args), COMMAND_TIMEOUT)
    }

    /// Runs `gdbus ARGS --address <this bus>` (gdbus takes the address after the subcommand).
    pub fn gdbus(&self, subcommand: &str, args: &[&str]) -> Output {
        run(self.command("gdbus").arg(subcommand).arg("--address").arg(&self.address).args(args), COMMAND_TIMEOUT)
    }

    /// Runs `busctl --address=<this bus> ARGS`.
    pub fn busctl(&self, args: &[&str]) -> Output {
        run(self.command("busctl").arg(format!("--address={}", self.address)).args(args), COMMAND_TIMEOUT)
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fasad on a [`TestBus`], killed when dropped.
pub struct Fasad {
    child: Child,
    stderr: PathBuf,
}

impl Fasad {
    /// Starts `fasad --session --no-calibrate-on-load ARGS` (calibrating takes tens of seconds)
    /// and waits for its `READY=1`. Panics with fasad's stderr when it exits first.
    pub fn start(bus: &TestBus, args: &[&str]) -> Fasad {
        let mut all = vec!["--no-calibrate-on-load"];
        all.extend_from_slice(args);
        Fasad::start_as_configured(bus, &all)
    }

    /// Starts `fasad --session ARGS` (calibrating on load unless ARGS say otherwise) and waits
    /// for its `READY=1` (sent once the name is owned). Panics with fasad's stderr when it exits
    /// first.
    pub fn start_as_configured(bus: &TestBus, args: &[&str]) -> Fasad {
        let notify_path = bus.dir().join(format!("notify-{}", unique()));
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let stderr = bus.dir().join(format!("fasad-{}.stderr", unique()));
        let child = bus
            .command(binary("fasad"))
            .arg("--session")
            .args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn fasad");
        let mut fasad = Fasad { child, stderr };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                    return fasad;
                }
            }
            if let Ok(Some(status)) = fasad.child.try_wait() {
                panic!("fasad exited at start ({status}) with:\n{}", fasad.stderr());
            }
            assert!(Instant::now() < deadline, "fasad not ready within {START_TIMEOUT:?}; its stderr:\n{}", fasad.stderr());
        }
    }

    /// What fasad wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether fasad is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits (up to `timeout`) for fasad to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        wait_timeout(&mut self.child, timeout)
    }
}

impl Drop for Fasad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `fasactl generate --json` running in the background, and the job path it printed first.
pub struct Background {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    /// The job's object path.
    pub job: String,
}

impl Background {
    /// Starts `fasactl generate --json` and returns once the job has produced text.
    pub fn start(bus: &TestBus, question: &str) -> Background {
        let mut child = bus
            .command(binary("fasactl"))
            .args(["generate", "--json", "--max-tokens", "2000", question])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fasactl");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(first["event"], "job", "{first}");
        let job = first["job"].as_str().unwrap().to_string();
        let mut bg = Background { child, lines, job };
        // Wait for text, so the job is past its prefill.
        let chunk: serde_json::Value = serde_json::from_str(&bg.lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(chunk["event"], "chunk", "{chunk}");
        bg
    }

    /// Sends a signal (`INT`, `KILL`, …) to fasactl.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Waits for fasactl to exit; returns its status and the JSON lines it printed since start.
    pub fn wait(&mut self) -> (std::process::ExitStatus, Vec<serde_json::Value>) {
        let rest: Vec<serde_json::Value> = self.lines.by_ref().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
        let status = wait_timeout(&mut self.child, Duration::from_secs(10)).expect("fasactl did not exit");
        (status, rest)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `cmd` to its end (killing it after `timeout`), capturing stdout and stderr.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("temporary folder");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let status = match wait_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}; stdout so far:\n{}", std::fs::read_to_string(&out).unwrap_or_default());
        }
    };
    Output { status, stdout: std::fs::read(&out).unwrap(), stderr: std::fs::read(&err).unwrap() }
}

/// stdout, stderr and status of an output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
