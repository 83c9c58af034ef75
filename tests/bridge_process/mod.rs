//! Test support: `fhir-pubsub run` as a child process, configured by FHIRPUBSUB_* variables, its
//! stderr collected line by line; killed (SIGKILL) when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The log line that says where the HTTP endpoints listen.
const HTTP_LISTENING: &str = "HTTP endpoints listening";

/// A bridge process on a store, its stderr collected.
pub struct BridgeProcess {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl BridgeProcess {
    /// `fhir-pubsub run` on `store_url` and the application queue `queue`, with both kinds of change
    /// events on (at most 3 changes per message, polling every second), the HTTP endpoints on a
    /// free port, and `pause` as the publisher's fault-injection point.
    pub fn start(store_url: &str, queue: &str, pause: Option<&str>) -> BridgeProcess {
        let mut command = Self::command(store_url, queue);
        command.env("FHIRPUBSUB_PubSub__ResourceChangeNotifications__MaxPublishBatchSize", "3");
        if let Some(point) = pause {
            command.env(fhir_pubsub::publisher::FAULT_PAUSE_ENV, point);
        }
        Self::spawn(command)
    }

    /// The command `start` runs, before its batch size and pause: add arguments or variables, then
    /// [`BridgeProcess::spawn`] it.
    pub fn command(store_url: &str, queue: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-pubsub"));
        command
            .arg("run")
            .env("RUST_LOG", "info")
            .env_remove("FHIRPUBSUB_LOG_FORMAT")
            .env("FHIRPUBSUB_Store__Url", store_url)
            .env("FHIRPUBSUB_PubSub__MessageBroker__ApplicationQueueName", queue)
            .env("FHIRPUBSUB_PubSub__ResourceChangeNotifications__SendFullEvents", "true")
            .env("FHIRPUBSUB_PubSub__ResourceChangeNotifications__SendLightEvents", "true")
            .env("FHIRPUBSUB_PubSub__ResourceChangeNotifications__PollingIntervalSeconds", "1")
            .env("FHIRPUBSUB_Http__Listen", "127.0.0.1:0")
            .env_remove(fhir_pubsub::publisher::FAULT_PAUSE_ENV);
        command
    }

    /// Starts `command` with its stderr collected.
    pub fn spawn(mut command: Command) -> BridgeProcess {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("start fhir-pubsub run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, lines) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        BridgeProcess { child, log }
    }

    pub fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub async fn wait_logged(&self, text: &str, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.logged(text) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// The address of the HTTP endpoints, from the log line that announces it (waits for it).
    pub async fn http_address(&self, limit: Duration) -> SocketAddr {
        assert!(self.wait_logged(HTTP_LISTENING, limit).await, "no HTTP endpoints: {}", self.log_text());
        let log = self.log.lock().unwrap();
        let line = log.iter().find(|l| l.contains(HTTP_LISTENING)).unwrap();
        // `address=127.0.0.1:4711` in text, `"address":"127.0.0.1:4711"` in JSON.
        let after = line.split_once("address=").or_else(|| line.split_once("\"address\":")).map(|(_, rest)| rest);
        let value = after.and_then(|rest| rest.split([' ', '"', ',']).find(|s| !s.is_empty()));
        value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no address in `{line}`"))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_terminate(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SIGTERM asks for a graceful stop.
        self.signal_terminate();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
