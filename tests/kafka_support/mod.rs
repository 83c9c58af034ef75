//! Test support for Kafka: a tansu broker of the test's own on a free loopback port, topics, and
//! a consumer that collects records with their keys and headers.
//!
//! tansu is installed by `scripts/services --kafka` into `${FHIR_PUBSUB_CACHE:-~/.cache/fhir-pubsub}/tansu`
//! (or named by FHIR_PUBSUB_TANSU). It keeps its data in memory (`--storage-engine memory://tansu/`)
//! or, for restart tests, in an SQLite file of the test's own (`sqlite://`), where a produce is one
//! transaction; it does not create topics on its own.
//!
//! Why not tansu's S3 storage (`s3://`) for restarts: it writes a produce in three steps (the
//! producer's sequence number, the partition's high watermark, then the record batch), so a broker
//! killed between the first and the last comes back without the batch but with its sequence
//! number taken; the producer's retry is then answered `DUPLICATE_SEQUENCE_NUMBER`, which the
//! idempotent producer takes for "already written", and acknowledged records are gone. Seen here
//! as replies missing after a SIGKILL. A Kafka broker appends the batch and its sequence together.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

/// Sends the bridge's logs to the test's output, filtered by RUST_LOG (default: warnings).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(filter).try_init();
}

/// The tansu binary: FHIR_PUBSUB_TANSU, else the cache `scripts/services --kafka` installs into.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FHIR_PUBSUB_TANSU") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("FHIR_PUBSUB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache").join("fhir-pubsub")
    });
    let binary = cache.join("tansu").join("bin").join("tansu");
    assert!(binary.exists(), "{} is missing: run scripts/services --kafka", binary.display());
    binary
}

/// A tansu broker on 127.0.0.1; killed (by its PID) when dropped.
pub struct Tansu {
    pub port: u16,
    child: Option<Child>,
    /// The directory of the SQLite file keeping the broker's data across restarts, if any.
    storage: Option<tempfile::TempDir>,
    /// Whether clients must authenticate (SASL).
    authentication: bool,
    /// The port clients are told to use (a TLS front-end's), when not `port`.
    advertised_port: Option<u16>,
    /// What the test's own clients use to reach it through TLS: the CA file, and a PKCS#12
    /// keystore with its password when the front-end demands a client certificate.
    pub client_tls: Option<(PathBuf, Option<(PathBuf, String)>)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().unwrap().port()
}

impl Tansu {
    /// A broker keeping its data in memory (gone when it stops).
    pub async fn start() -> Tansu {
        init_logs();
        let mut tansu = Tansu::new(None, false);
        tansu.launch().await;
        tansu
    }

    fn new(storage: Option<tempfile::TempDir>, authentication: bool) -> Tansu {
        Tansu { port: free_port(), child: None, storage, authentication, advertised_port: None, client_tls: None }
    }

    /// A broker (data in memory) on a plain port that advertises `advertised_port`, where a TLS
    /// front-end forwards to it (tansu 0.6's own `--cert`/`--key` cannot be given together); the
    /// test's clients use `client_tls`.
    pub async fn start_behind(advertised_port: u16, client_tls: (PathBuf, Option<(PathBuf, String)>)) -> Tansu {
        init_logs();
        let mut tansu = Tansu::new(None, false);
        tansu.advertised_port = Some(advertised_port);
        tansu.client_tls = Some(client_tls);
        tansu.launch().await;
        tansu
    }

    /// A broker (data in memory) that requires SASL authentication; it knows no user.
    pub async fn start_authenticating() -> Tansu {
        init_logs();
        let mut tansu = Tansu::new(None, true);
        tansu.launch().await;
        tansu
    }

    /// A broker keeping its data in an SQLite file of its own, so that it survives [`Tansu::restart`]
    /// (even a SIGKILL: each produce is one SQLite transaction).
    pub async fn start_persistent() -> Tansu {
        init_logs();
        let storage = tempfile::tempdir().expect("a directory for the broker's data");
        let mut tansu = Tansu::new(Some(storage), false);
        tansu.launch().await;
        tansu
    }

    async fn launch(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port.unwrap_or(self.port));
        let mut command = Command::new(tansu_binary());
        command.args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised]);
        command.args(["--cluster-id", "fhir-pubsub-test"]);
        if self.authentication {
            command.arg("--authentication");
        }

        match &self.storage {
            None => {
                command.args(["--storage-engine", "memory://tansu/"]);
            }
            // tansu resolves `sqlite://FILE` against its working directory.
            Some(dir) => {
                command.args(["--storage-engine", "sqlite://tansu.db"]).current_dir(dir.path());
            }
        }
        // FHIR_PUBSUB_TANSU_LOG names a file that collects the broker's output (appended across restarts).
        let log = std::env::var_os("FHIR_PUBSUB_TANSU_LOG")
            .and_then(|path| std::fs::OpenOptions::new().create(true).append(true).open(path).ok());
        let (out, err) = match log.and_then(|f| f.try_clone().ok().map(|g| (f, g))) {
            Some((f, g)) => (Stdio::from(f), Stdio::from(g)),
            None => (Stdio::null(), Stdio::null()),
        };
        let child = command.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("tansu starts");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("tansu did not listen on 127.0.0.1:{}", self.port);
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port.unwrap_or(self.port))
    }

    /// Kills the broker (SIGKILL); in-memory data goes with it, data in its SQLite file stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap());
        if let Some((ca, keystore)) = &self.client_tls {
            config.set("security.protocol", "ssl").set("ssl.ca.location", ca.display().to_string());
            if let Some((path, password)) = keystore {
                config.set("ssl.keystore.location", path.display().to_string()).set("ssl.keystore.password", password);
            }
        }
        config
    }

    /// Creates topics (tansu does not create them on its own).
    pub async fn create_topics(&self, topics: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create().expect("admin client");
        let new: Vec<NewTopic<'_>> =
            topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
        let results = admin.create_topics(&new, &AdminOptions::new()).await.expect("create topics");
        for result in results {
            result.unwrap_or_else(|(topic, code)| panic!("creating {topic}: {code}"));
        }
    }

    pub fn producer(&self) -> FutureProducer {
        self.client_config().set("enable.idempotence", "true").create().expect("producer")
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Produces one record and waits for its acknowledgement.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    value: &[u8],
    headers: &[(&str, &str)],
) {
    let mut owned = OwnedHeaders::new();
    for (k, v) in headers {
        owned = owned.insert(Header { key: k, value: Some(*v) });
    }
    let mut record = FutureRecord::<str, [u8]>::to(topic).payload(value).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("record acknowledged");
}

/// A record as a test reads it.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.value).unwrap_or(Value::Null)
    }

    fn from_message(m: &impl Message) -> Record {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = h.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                        (h.key.to_owned(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }
}

/// Every record of `topic` from its first offset to its end, read by a consumer of its own (no
/// group position involved): what the broker holds now.
pub async fn read_topic(tansu: &Tansu, topic: &str) -> Vec<Record> {
    let consumer: StreamConsumer = tansu
        .client_config()
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut records = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(Ok(m)) => records.push(Record::from_message(&m)),
            Ok(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | Err(_) => return records,
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Collects every record of some topics, from their beginning, in arrival order.
pub struct Collector {
    records: Arc<Mutex<Vec<Record>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(tansu: &Tansu, topics: &[&str]) -> Collector {
        let consumer: StreamConsumer = tansu
            .client_config()
            .set("group.id", format!("collector-{}", uuid::Uuid::new_v4().simple()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        consumer.subscribe(topics).expect("subscribe");
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        let task = tokio::spawn(async move {
            loop {
                match consumer.recv().await {
                    Ok(m) => sink.lock().unwrap().push(Record::from_message(&m)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Collector { records, task }
    }

    pub fn records(&self, topic: &str) -> Vec<Record> {
        self.records.lock().unwrap().iter().filter(|r| r.topic == topic).cloned().collect()
    }

    /// Waits until `topic` holds at least `count` records (at most 60 s); returns them all.
    pub async fn wait_for(&self, topic: &str, count: usize) -> Vec<Record> {
        for _ in 0..1200 {
            let records = self.records(topic);
            if records.len() >= count {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.records(topic)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}
