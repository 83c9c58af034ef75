//! Claim checks: store plans whose instructions are in a blob (`{ "payload": { "data-ref": URL } }`),
//! fetched through `object_store` from Azure Blob Storage (Firely's `PubSub.ClaimCheck`), or beyond
//! Firely from S3, Google Cloud Storage or a local directory.
//!
//! Invariants:
//! - a URL outside the configured account/bucket/directory and container is refused before any
//!   request is made ([`Locator`] states the rule);
//! - a blob over `Limits.MaxClaimCheckBytes` is refused by its size before it is read, and reading
//!   stops as soon as more than that arrives (the size may change between the two requests);
//! - a failure that may pass (the store unreachable, a 5xx) is [`ClaimCheckError::Unavailable`]:
//!   the bridge gives the command back to the broker instead of answering it; every other failure
//!   is final and answered with the cause;
//! - blobs are only read, never written or deleted;
//! - the account key, SAS or secret access key never appears in an error or a log line.

mod azure;
mod location;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

pub use azure::{Account, Credential, parse_connection_string};
pub use location::{BlobRef, Locator};

use crate::config::{ClaimCheckSettings, ClaimCheckStorage, redact_url};
use crate::contracts::read::{self, StoreInstructionRead, StorePlanMessage};
use crate::contracts::{ItemError, Status, StatusDetails};
use crate::json;

/// Default of `Limits.MaxClaimCheckBytes`.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Why a claim check gives no plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimCheckError {
    /// `PubSub.ClaimCheck.StorageType` is `Disabled`.
    #[error("claim checks are disabled (PubSub.ClaimCheck.StorageType); send the instructions inline")]
    Disabled,
    /// The URL is outside the configured storage; no request was made.
    #[error("the claim-check URL `{url}` {reason}; it was not fetched")]
    Refused { url: String, reason: String },
    /// No blob at the URL.
    #[error("the claim-check blob `{url}` does not exist")]
    NotFound { url: String },
    /// The blob is larger than `Limits.MaxClaimCheckBytes`.
    #[error(
        "the claim-check blob `{url}` has {size} bytes or more; at most {limit} are read (Limits.MaxClaimCheckBytes)"
    )]
    TooLarge { url: String, size: u64, limit: u64 },
    /// The blob is not JSON.
    #[error("the claim-check blob `{url}` is not JSON: {reason}")]
    NotJson { url: String, reason: String },
    /// The blob is JSON but not `{ "instructions": [...] }`.
    #[error("the claim-check blob `{url}` is not a store plan: {reason}")]
    NotAPlan { url: String, reason: String },
    /// The store refused the bridge's credentials or the request: only the operator can fix it.
    #[error("the storage refused to give the claim-check blob `{url}` to the bridge: {reason}")]
    Denied { url: String, reason: String },
    /// The store answered the request with another client error (4xx), such as a name it does not
    /// accept: retrying would get the same answer.
    #[error("the storage rejected the request for the claim-check blob `{url}`: {reason}")]
    Rejected { url: String, reason: String },
    /// The store could not be reached or failed on its side; worth another attempt later.
    #[error("the claim-check storage is unavailable: {0}")]
    Unavailable(String),
}

impl ClaimCheckError {
    /// The `outcome` label of [`crate::observe::metrics::CLAIM_CHECKS`].
    pub fn outcome(&self) -> &'static str {
        match self {
            ClaimCheckError::Disabled | ClaimCheckError::Refused { .. } => "refused",
            ClaimCheckError::NotFound { .. } => "not_found",
            ClaimCheckError::TooLarge { .. } => "too_large",
            ClaimCheckError::NotJson { .. } | ClaimCheckError::NotAPlan { .. } => "not_a_plan",
            ClaimCheckError::Denied { .. } => "denied",
            ClaimCheckError::Rejected { .. } => "rejected",
            ClaimCheckError::Unavailable(_) => "unavailable",
        }
    }

    /// Whether the command should be delivered again later instead of being answered.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClaimCheckError::Unavailable(_))
    }

    /// The reply's error: `badRequest`/`BadRequestWrongPayloadFormat` for what the sender can fix
    /// (the URL, the blob), `internalServerError` for what only the operator can (credentials).
    pub fn item_error(&self) -> ItemError {
        let message = format!("{}.", capitalize_first(&self.to_string()));
        match self {
            ClaimCheckError::Denied { .. } | ClaimCheckError::Unavailable(_) => {
                ItemError { item_id: None, status: Status::internal(), message: Some(message) }
            }
            _ => ItemError::new(None, StatusDetails::BadRequestWrongPayloadFormat, message),
        }
    }
}

fn capitalize_first(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// Without `AzureBlobContainerName`, clients of this many containers are kept; others are built per
/// claim check.
const MAX_CACHED_CONTAINERS: usize = 64;

/// The configured claim-check store: its URL rule, its clients and the size limit.
pub struct ClaimChecks {
    locator: Locator,
    stores: Stores,
    max_bytes: u64,
    /// For the start-up log line (no secret).
    description: String,
}

/// The object stores by container: Azure gets one client per container it is asked for (the
/// account's clients share nothing but the settings); the others have one bucket or directory.
enum Stores {
    One(Arc<dyn ObjectStore>),
    AzurePerContainer { account: Account, clients: Mutex<HashMap<String, Arc<dyn ObjectStore>>> },
}

impl std::fmt::Debug for ClaimChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimChecks").field("store", &self.description).field("max_bytes", &self.max_bytes).finish()
    }
}

/// How long one request may take, and how often a failed one is tried again inside a fetch, before
/// the command is given back to the broker (which delivers it again later).
fn client_options(allow_http: bool) -> object_store::ClientOptions {
    object_store::ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(15), ..Default::default() }
}

impl ClaimChecks {
    /// Checks the settings of an enabled claim check without building a client: the key at fault
    /// (under `PubSub.ClaimCheck`) and the problem. Never quotes a secret.
    pub fn check_settings(settings: &ClaimCheckSettings) -> Result<(), (&'static str, String)> {
        Self::locator(settings).map(|_| ())
    }

    fn locator(settings: &ClaimCheckSettings) -> Result<(Locator, Option<Account>), (&'static str, String)> {
        let text = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        match settings.storage_type {
            ClaimCheckStorage::AzureBlobStorage => {
                let connection = text(&settings.azure_blob_storage_connection_string).unwrap_or_default();
                let account = parse_connection_string(&connection)
                    .map_err(|problem| ("AzureBlobStorageConnectionString", problem))?;
                let container = text(&settings.azure_blob_container_name);
                if let Some(c) = &container
                    && Locator::azure(&account.blob_endpoint, None)
                        .resolve(&format!("{}/{c}/x", account.blob_endpoint.as_str().trim_end_matches('/')))
                        .is_err()
                {
                    return Err(("AzureBlobContainerName", format!("`{c}` is not a container name")));
                }
                Ok((Locator::azure(&account.blob_endpoint, container.as_deref()), Some(account)))
            }
            ClaimCheckStorage::S3 => {
                let bucket = text(&settings.bucket).ok_or(("Bucket", "is required".to_owned()))?;
                let endpoint = match text(&settings.endpoint) {
                    Some(e) => Some(
                        Url::parse(e.trim_end_matches('/')).map_err(|e| ("Endpoint", format!("is not a URL ({e})")))?,
                    ),
                    None => None,
                };
                if settings.access_key_id.is_some() != settings.secret_access_key.is_some() {
                    return Err(("SecretAccessKey", "and AccessKeyId go together: set both or neither".into()));
                }
                Ok((Locator::s3(&bucket, text(&settings.region).as_deref(), endpoint.as_ref()), None))
            }
            ClaimCheckStorage::GoogleCloudStorage => {
                let bucket = text(&settings.bucket).ok_or(("Bucket", "is required".to_owned()))?;
                Ok((Locator::gcs(&bucket), None))
            }
            ClaimCheckStorage::LocalFiles => {
                let directory = text(&settings.directory).ok_or(("Directory", "is required".to_owned()))?;
                let canonical = std::fs::canonicalize(&directory)
                    .map_err(|e| ("Directory", format!("`{directory}` cannot be opened: {e}")))?;
                Ok((Locator::local(&canonical).map_err(|p| ("Directory", p))?, None))
            }
            ClaimCheckStorage::Disabled => Err(("StorageType", "is Disabled".into())),
        }
    }

    /// The configured store, or `None` when claim checks are disabled. Builds the clients (no
    /// request is made); the error names the key at fault.
    pub fn from_settings(settings: &ClaimCheckSettings, max_bytes: u64) -> Result<Option<ClaimChecks>, String> {
        if settings.storage_type == ClaimCheckStorage::Disabled {
            return Ok(None);
        }
        let (locator, account) =
            Self::locator(settings).map_err(|(key, problem)| format!("PubSub.ClaimCheck.{key}: {problem}"))?;
        let fail = |e: object_store::Error| format!("PubSub.ClaimCheck: {}", scrub(&e.to_string(), settings));
        let text = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        let (stores, description) = match settings.storage_type {
            ClaimCheckStorage::AzureBlobStorage => {
                let account = account.expect("the Azure locator comes with its account");
                let container = text(&settings.azure_blob_container_name);
                let description = format!(
                    "Azure Blob Storage {}/{}",
                    account.blob_endpoint.as_str().trim_end_matches('/'),
                    container.as_deref().unwrap_or("<any container>")
                );
                // A client built now shows a key the client library refuses at start, not per message.
                azure_client(&account, container.as_deref().unwrap_or("fhir-pubsub")).map_err(fail)?;
                let stores = Stores::AzurePerContainer { account, clients: Mutex::new(HashMap::new()) };
                if let (Some(container), Stores::AzurePerContainer { account, clients }) = (&container, &stores) {
                    let client = azure_client(account, container).map_err(fail)?;
                    clients.lock().unwrap_or_else(PoisonError::into_inner).insert(container.clone(), client);
                }
                (stores, description)
            }
            ClaimCheckStorage::S3 => {
                let bucket = text(&settings.bucket).unwrap_or_default();
                let mut builder =
                    object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket).with_retry(retry_config());
                if let Some(region) = text(&settings.region) {
                    builder = builder.with_region(region);
                }
                let mut allow_http = false;
                if let Some(endpoint) = text(&settings.endpoint) {
                    allow_http = endpoint.starts_with("http://");
                    builder =
                        builder.with_endpoint(endpoint.trim_end_matches('/')).with_virtual_hosted_style_request(false);
                }
                if let (Some(id), Some(secret)) = (text(&settings.access_key_id), text(&settings.secret_access_key)) {
                    builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                }
                let store = builder.with_client_options(client_options(allow_http)).build().map_err(fail)?;
                (Stores::One(Arc::new(store)), format!("S3 bucket {bucket}"))
            }
            ClaimCheckStorage::GoogleCloudStorage => {
                let bucket = text(&settings.bucket).unwrap_or_default();
                let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&bucket)
                    .with_retry(retry_config())
                    .with_client_options(client_options(false));
                if let Some(path) = text(&settings.service_account_path) {
                    builder = builder.with_service_account_path(path);
                }
                (Stores::One(Arc::new(builder.build().map_err(fail)?)), format!("Google Cloud Storage bucket {bucket}"))
            }
            ClaimCheckStorage::LocalFiles => {
                let directory = std::fs::canonicalize(text(&settings.directory).unwrap_or_default())
                    .map_err(|e| format!("PubSub.ClaimCheck.Directory: {e}"))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&directory).map_err(fail)?;
                (Stores::One(Arc::new(store)), format!("local directory {}", directory.display()))
            }
            ClaimCheckStorage::Disabled => return Ok(None),
        };
        Ok(Some(ClaimChecks { locator, stores, max_bytes, description }))
    }

    /// What the store is, for a log line (no secret).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The blob `data_ref` names, or why it is refused (no request is made).
    pub fn resolve(&self, data_ref: &str) -> Result<BlobRef, ClaimCheckError> {
        self.locator.resolve(data_ref).map_err(|reason| ClaimCheckError::Refused { url: shown(data_ref), reason })
    }

    /// Fetches and reads the plan of a resolved blob: one size request, then the content, read up
    /// to the limit.
    pub async fn fetch(&self, data_ref: &str, blob: &BlobRef) -> Result<Vec<StoreInstructionRead>, ClaimCheckError> {
        let url = shown(data_ref);
        // Building a client makes no request: its failure is the settings', not a passing one.
        let store = self
            .store(&blob.container)
            .map_err(|e| ClaimCheckError::Denied { url: url.clone(), reason: first_line(&e) })?;
        let meta = store.head(&blob.path).await.map_err(|e| classify(e, &url))?;
        if meta.size > self.max_bytes {
            return Err(ClaimCheckError::TooLarge { url, size: meta.size, limit: self.max_bytes });
        }
        let body = read_limited(store.as_ref(), &blob.path, self.max_bytes).await.map_err(|e| match e {
            Limited::Store(e) => classify(e, &url),
            Limited::Over(size) => ClaimCheckError::TooLarge { url: url.clone(), size, limit: self.max_bytes },
        })?;
        parse_plan(&body, &url)
    }

    /// Asks the storage about a blob that does not exist, for `check-config`: `Ok` when the storage
    /// answers and accepts the credentials, with a note.
    pub async fn probe(&self) -> Result<String, String> {
        let container = match &self.stores {
            Stores::One(_) => String::new(),
            Stores::AzurePerContainer { clients, .. } => {
                let known = clients.lock().unwrap_or_else(PoisonError::into_inner).keys().next().cloned();
                match known {
                    Some(container) => container,
                    None => return Ok(" (not tried: no AzureBlobContainerName to ask about)".into()),
                }
            }
        };
        let store = self.store(&container).map_err(|e| first_line(&e))?;
        let probe = Path::from("fhir-pubsub-check-config-probe");
        match store.head(&probe).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(" (storage answers, credentials accepted)".into()),
            Err(e) => Err(classify(e, "fhir-pubsub-check-config-probe").to_string()),
        }
    }

    fn store(&self, container: &str) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
        match &self.stores {
            Stores::One(store) => Ok(store.clone()),
            Stores::AzurePerContainer { account, clients } => {
                let mut clients = clients.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(client) = clients.get(container) {
                    return Ok(client.clone());
                }
                let client = azure_client(account, container)?;
                // Containers are named by messages: keep a bounded number of clients.
                if clients.len() < MAX_CACHED_CONTAINERS {
                    clients.insert(container.to_owned(), client.clone());
                }
                Ok(client)
            }
        }
    }
}

fn azure_client(account: &Account, container: &str) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    let endpoint = account.blob_endpoint.as_str().trim_end_matches('/').to_owned();
    let mut builder = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(&account.name)
        .with_container_name(container)
        .with_endpoint(endpoint)
        .with_retry(retry_config())
        .with_client_options(client_options(account.blob_endpoint.scheme() == "http"));
    builder = match &account.credential {
        Credential::AccountKey(key) => builder.with_access_key(key),
        Credential::Sas(pairs) => builder.with_sas_authorization(pairs.clone()),
    };
    Ok(Arc::new(builder.build()?))
}

/// A URL as it may be shown: secrets in it hidden.
fn shown(data_ref: &str) -> String {
    redact_url(data_ref.trim())
}

/// Hides the secrets of the settings in a text from `object_store`.
fn scrub(text: &str, settings: &ClaimCheckSettings) -> String {
    let mut secrets: Vec<String> = settings.secret_access_key.iter().cloned().collect();
    if let Some(cs) = &settings.azure_blob_storage_connection_string {
        secrets.extend(crate::config::secrets_in(cs));
    }
    crate::config::Scrubber::new(secrets).hide(text).into_owned()
}

fn classify(error: object_store::Error, url: &str) -> ClaimCheckError {
    use object_store::Error as E;
    match error {
        E::NotFound { .. } => ClaimCheckError::NotFound { url: url.to_owned() },
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            ClaimCheckError::Denied { url: url.to_owned(), reason: first_line(&error) }
        }
        E::InvalidPath { .. } | E::NotSupported { .. } => {
            ClaimCheckError::Refused { url: url.to_owned(), reason: first_line(&error) }
        }
        // Everything else comes as Generic: connection failures, timeouts and 5xx pass, any other
        // answer of the storage would come again.
        other if is_passing(&other) => ClaimCheckError::Unavailable(first_line(&other)),
        other => ClaimCheckError::Rejected { url: url.to_owned(), reason: first_line(&other) },
    }
}

/// Whether a failure may pass: no answer (a connection or timeout error of the HTTP client), or an
/// answer that says so (5xx, 408, 429). object_store keeps the status of a response to itself but
/// writes it in its message (`… status code: 400 Bad Request …`); an error that shows neither is
/// taken as passing, so a doubt costs a retry rather than a wrong final answer.
fn is_passing(error: &object_store::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if e.downcast_ref::<object_store::client::HttpError>().is_some() {
            return true;
        }
        if let Some(code) = status_in(&e.to_string()) {
            return code >= 500 || code == 408 || code == 429;
        }
        source = e.source();
    }
    true
}

/// The HTTP status written in an object_store message: `… status code: 400 Bad Request …`.
fn status_in(text: &str) -> Option<u16> {
    let (_, after) = text.split_once("status code: ")?;
    let code: String = after.chars().take_while(char::is_ascii_digit).collect();
    code.parse().ok().filter(|c| (100..600).contains(c))
}

fn first_line(error: &object_store::Error) -> String {
    error.to_string().lines().next().unwrap_or_default().chars().take(500).collect()
}

enum Limited {
    Store(object_store::Error),
    /// More than the limit arrived: at least this many bytes.
    Over(u64),
}

/// Reads a blob, stopping as soon as more than `limit` bytes arrived.
async fn read_limited(store: &dyn ObjectStore, path: &Path, limit: u64) -> Result<Vec<u8>, Limited> {
    let mut stream = store.get(path).await.map_err(Limited::Store)?.into_stream();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Limited::Store)?;
        body.extend_from_slice(&chunk);
        if body.len() as u64 > limit {
            return Err(Limited::Over(body.len() as u64));
        }
    }
    Ok(body)
}

/// Reads a blob's content as a store plan: `{ "instructions": [...] }`, read as leniently as an
/// inline plan (comments, trailing commas, a byte-order mark).
pub fn parse_plan(body: &[u8], url: &str) -> Result<Vec<StoreInstructionRead>, ClaimCheckError> {
    let not_json = |reason: String| ClaimCheckError::NotJson { url: url.to_owned(), reason };
    let text = json::utf8(body).map_err(|e| not_json(e.to_string()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let raw = json::parse_lenient(text).map_err(|e| not_json(e.to_string()))?;
    match read::store_plan(&raw) {
        Ok(StorePlanMessage::Instructions(list)) => Ok(list),
        Ok(StorePlanMessage::ClaimCheck { .. }) => Err(ClaimCheckError::NotAPlan {
            url: url.to_owned(),
            reason: "it is another claim check; a blob must hold the instructions themselves".into(),
        }),
        Err(e) => Err(ClaimCheckError::NotAPlan { url: url.to_owned(), reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_that_are_not_plans_are_refused_with_the_cause() {
        let url = "https://acc.blob.core.windows.net/c/p";
        assert_eq!(parse_plan(br#"{"instructions": []}"#, url).unwrap().len(), 0);
        assert_eq!(
            parse_plan(b"\xef\xbb\xbf{\"instructions\": [{\"itemId\": \"1\"},], // x\n}", url).unwrap().len(),
            1
        );
        assert!(matches!(parse_plan(b"hello", url), Err(ClaimCheckError::NotJson { .. })));
        assert!(matches!(parse_plan(b"\xff\xfe", url), Err(ClaimCheckError::NotJson { .. })));
        assert!(matches!(parse_plan(br#"{"resourceType": "Patient"}"#, url), Err(ClaimCheckError::NotAPlan { .. })));
        assert!(matches!(parse_plan(br#"[1, 2]"#, url), Err(ClaimCheckError::NotAPlan { .. })));
        let nested = parse_plan(br#"{"payload": {"data-ref": "https://x/y"}}"#, url).unwrap_err();
        assert!(nested.to_string().contains("another claim check"), "{nested}");
    }

    #[test]
    fn errors_map_to_what_the_sender_or_the_operator_can_fix() {
        let refused = ClaimCheckError::Refused { url: "u".into(), reason: "is elsewhere".into() }.item_error();
        assert_eq!(refused.status, Status::of(StatusDetails::BadRequestWrongPayloadFormat));
        assert_eq!(refused.message.as_deref(), Some("The claim-check URL `u` is elsewhere; it was not fetched."));
        let denied = ClaimCheckError::Denied { url: "u".into(), reason: "403".into() }.item_error();
        assert_eq!(denied.status, Status::internal());
        assert!(ClaimCheckError::Unavailable("down".into()).is_retryable());
        assert!(!ClaimCheckError::NotFound { url: "u".into() }.is_retryable());
    }

    /// A storage that answers every request with `status` and no body.
    async fn answering(status: &'static str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let response = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        port
    }

    async fn fetch_from(port: u16) -> ClaimCheckError {
        let settings = ClaimCheckSettings {
            storage_type: ClaimCheckStorage::AzureBlobStorage,
            azure_blob_container_name: Some("plans".into()),
            azure_blob_storage_connection_string: Some(format!(
                "AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1"
            )),
            ..ClaimCheckSettings::default()
        };
        let claim_checks = ClaimChecks::from_settings(&settings, 1024).unwrap().unwrap();
        let url = format!("http://127.0.0.1:{port}/devstoreaccount1/plans/p.json");
        let blob = claim_checks.resolve(&url).unwrap();
        claim_checks.fetch(&url, &blob).await.unwrap_err()
    }

    #[tokio::test]
    async fn storage_answers_are_told_apart_from_passing_failures() {
        assert!(matches!(fetch_from(answering("404 Not Found").await).await, ClaimCheckError::NotFound { .. }));
        assert!(matches!(fetch_from(answering("403 Forbidden").await).await, ClaimCheckError::Denied { .. }));
        let rejected = fetch_from(answering("400 Bad Request").await).await;
        assert!(matches!(rejected, ClaimCheckError::Rejected { .. }), "{rejected:?}");
        assert!(!rejected.is_retryable());
        let unavailable = fetch_from(answering("503 Service Unavailable").await).await;
        assert!(unavailable.is_retryable(), "{unavailable:?}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let refused = fetch_from(closed).await;
        assert!(refused.is_retryable(), "{refused:?}");
    }

    #[tokio::test]
    async fn reading_stops_past_the_limit_even_when_the_size_said_less() {
        // The size request and the read are two requests: the blob may have grown in between.
        let store = object_store::memory::InMemory::new();
        let path = Path::from("p.json");
        store.put(&path, vec![b' '; 10_000].into()).await.unwrap();
        assert!(matches!(read_limited(&store, &path, 100).await, Err(Limited::Over(n)) if n > 100));
        assert_eq!(read_limited(&store, &path, 10_000).await.ok().map(|b| b.len()), Some(10_000));
    }

    #[test]
    fn urls_are_shown_without_their_signature() {
        let err = ClaimCheckError::NotFound { url: shown("https://a.blob.core.windows.net/c/p?sv=1&sig=c2VjcmV0") };
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    }
}
