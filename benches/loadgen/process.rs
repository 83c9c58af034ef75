//! Child processes of a run: the bridge (`fhir-pubsub run`, configured by FHIRPUBSUB_* variables,
//! its log in a file) and the echo responder; the time a bridge takes to be ready and its memory,
//! read from `/proc/PID/status`. Each child is killed when its handle is dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running child process, killed (SIGKILL) when dropped.
pub struct ChildProcess {
    child: Child,
    pub started: Instant,
}

impl ChildProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Peak and current resident memory in MiB (`VmHWM`, `VmRSS`).
    pub fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .unwrap_or(f64::NAN)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// SIGTERM, then waits (at most `limit`, then SIGKILL).
    pub fn stop(mut self, limit: Duration) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a bridge is started.
pub struct BridgeSpec<'a> {
    pub binary: &'a Path,
    pub store_url: &'a str,
    pub queue: &'a str,
    pub full_events: bool,
    pub light_events: bool,
    /// Where its log goes.
    pub log: PathBuf,
}

/// A bridge process and the address of its HTTP endpoints.
pub struct Bridge {
    pub process: ChildProcess,
    pub http_port: u16,
}

impl Bridge {
    pub fn start(spec: &BridgeSpec) -> anyhow::Result<Bridge> {
        let http_port = free_port()?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&spec.log)?;
        let mut command = Command::new(spec.binary);
        command
            .arg("run")
            .env_remove("RUST_LOG")
            .env("FHIRPUBSUB_Store__Url", spec.store_url)
            .env("FHIRPUBSUB_PubSub__MessageBroker__Host", "127.0.0.1")
            .env("FHIRPUBSUB_PubSub__MessageBroker__ApplicationQueueName", spec.queue)
            .env("FHIRPUBSUB_PubSub__ResourceChangeNotifications__SendFullEvents", spec.full_events.to_string())
            .env("FHIRPUBSUB_PubSub__ResourceChangeNotifications__SendLightEvents", spec.light_events.to_string())
            .env("FHIRPUBSUB_Http__Listen", format!("127.0.0.1:{http_port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let started = Instant::now();
        let child = command.spawn()?;
        Ok(Bridge { process: ChildProcess { child, started }, http_port })
    }

    /// Waits until `/readyz` answers 200 and returns the time since the process was started.
    pub async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        while self.process.started.elapsed() < limit {
            if let Ok(Some(status)) = self.process.child.try_wait() {
                anyhow::bail!("the bridge exited before it was ready ({status})");
            }
            if http_status(self.http_port, "/readyz").await == Some(200) {
                return Ok(self.process.started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::bail!("the bridge was not ready within {limit:?}")
    }
}

/// Starts this program again as the echo responder on `queue`, its output in `log`.
pub fn start_echo(queue: &str, prefetch: u16, concurrency: usize, log: &Path) -> anyhow::Result<ChildProcess> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let child = Command::new(std::env::current_exe()?)
        .args(["--bench", "--echo", queue, "--prefetch", &prefetch.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(ChildProcess { child, started: Instant::now() })
}

/// CPU time (user + system) process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name; Linux counts 100 ticks a second.
    (ticks(11) + ticks(12)) / 100.0
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The status code of `GET path` on 127.0.0.1:`port`, `None` when nothing answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
