//! Test support: Azurite, the Azure Storage emulator, on a free loopback port of the test's own.
//!
//! Installed by `scripts/services --azurite` into `${FHIR_PUBSUB_CACHE:-~/.cache/fhir-pubsub}/azurite`
//! (or named by FHIR_PUBSUB_AZURITE, the `azurite-blob` script). Started with telemetry off, its
//! data in a temporary directory, and a debug log from
//! which the test reads every request the emulator received. Killed by its PID when dropped.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};

/// The emulator's well-known account and key (public, from Microsoft's documentation).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The `azurite-blob` script.
pub fn azurite_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FHIR_PUBSUB_AZURITE") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("FHIR_PUBSUB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache").join("fhir-pubsub")
    });
    let binary = cache.join("azurite").join("node_modules").join(".bin").join("azurite-blob");
    assert!(binary.exists(), "{} is missing: run scripts/services --azurite", binary.display());
    binary
}

pub struct Azurite {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Azurite {
    pub async fn start() -> Azurite {
        let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port();
        let mut azurite = Azurite { port, child: None, dir: tempfile::tempdir().expect("temp dir") };
        azurite.launch().await;
        azurite
    }

    async fn launch(&mut self) {
        let child = Command::new(azurite_binary())
            .args(["--blobHost", "127.0.0.1", "--blobPort", &self.port.to_string(), "--disableTelemetry", "--silent"])
            .arg("--location")
            .arg(self.dir.path().join("data"))
            .arg("--debug")
            .arg(self.debug_log())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("azurite-blob starts (scripts/services --azurite installs it)");
        self.child = Some(child);
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("Azurite did not listen on 127.0.0.1:{}", self.port);
    }

    fn debug_log(&self) -> PathBuf {
        self.dir.path().join("debug.log")
    }

    /// Kills the emulator (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The account's blob endpoint, path style: `http://127.0.0.1:<port>/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// A connection string for the account, as a user would configure it for Azurite.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={}/;",
            self.endpoint()
        )
    }

    /// The URL of a blob.
    pub fn blob_url(&self, container: &str, name: &str) -> String {
        format!("{}/{container}/{name}", self.endpoint())
    }

    /// Creates a container (`PUT ?restype=container`, signed with the account key).
    pub fn create_container(&self, name: &str) {
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &base64::engine::general_purpose::STANDARD.decode(KEY).unwrap(),
        );
        let signature = base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, to_sign.as_bytes()));
        let request = format!(
            "PUT /{ACCOUNT}/{name}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-date: {date}\r\n\
             x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{signature}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        );
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to Azurite");
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 201"), "creating container {name}: {response}");
    }

    /// A client of one container (the test's own, to put and look at blobs).
    pub fn container(&self, name: &str) -> MicrosoftAzure {
        MicrosoftAzureBuilder::new()
            .with_account(ACCOUNT)
            .with_access_key(KEY)
            .with_container_name(name)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .build()
            .expect("Azure client")
    }

    /// The requests other than `PUT` (the test's own uploads and container creations) whose URL
    /// contains `fragment`: what the bridge asked for.
    pub fn reads(&self, fragment: &str) -> Vec<String> {
        self.requests(fragment).into_iter().filter(|r| !r.starts_with("PUT ")).collect()
    }

    /// Every request Azurite received so far whose URL contains `fragment`, as `METHOD URL`.
    pub fn requests(&self, fragment: &str) -> Vec<String> {
        let log = std::fs::read_to_string(self.debug_log()).unwrap_or_default();
        log.lines()
            .filter_map(|line| line.split_once("RequestMethod=").map(|(_, rest)| rest))
            .filter_map(|rest| {
                let (method, rest) = rest.split_once(" RequestURL=")?;
                let url = rest.split(' ').next()?;
                Some(format!("{method} {url}"))
            })
            .filter(|request| request.contains(fragment))
            .collect()
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.kill();
    }
}
