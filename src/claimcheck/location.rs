//! Which `data-ref` URLs the bridge fetches: the URL rule.
//!
//! A message must not make the bridge fetch arbitrary URLs with its credentials, so a URL is
//! resolved to a blob of the configured store only when **all** of these hold, and is refused
//! otherwise, before any request is made:
//! - scheme, host and port are those of the configured store (`https://acc.blob.core.windows.net`,
//!   the emulator's `http://127.0.0.1:10000/devstoreaccount1`, `s3://bucket`, `gs://bucket`,
//!   `file://` under the configured directory); a path-style account (the emulator's) must match too;
//! - the container (or bucket) is the configured one (Azure without `AzureBlobContainerName`: any
//!   container of the account);
//! - no user, password, query string or fragment: the bridge signs with its own credentials and a
//!   SAS or parameter in a message is not honoured;
//! - no `.` or `..` segment, also when percent-encoded (`%2e%2E`), no encoded `/` (`%2F`) and no
//!   backslash or control character anywhere: the path cannot climb out of the container;
//! - a blob name of at most 1024 bytes remains after the container.

use object_store::path::Path;
use percent_encoding::percent_decode_str;
use url::Url;

/// The longest blob name Azure, S3 and Google Cloud Storage accept.
const MAX_NAME_BYTES: usize = 1024;

/// A blob the bridge may fetch: its container (bucket; empty for local files) and name in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub container: String,
    pub path: Path,
}

/// Where a blob's container is named.
#[derive(Debug, Clone)]
enum ContainerIn {
    /// The first path segment after the root's prefix.
    Path,
    /// Implied by the root (a bucket in the host name, a local directory).
    Fixed(String),
}

/// One URL form the configured store is reached by.
#[derive(Debug, Clone)]
struct Root {
    scheme: String,
    /// Lower case; `None` for `file://` (no host, or `localhost`).
    host: Option<String>,
    port: Option<u16>,
    /// Path segments before the container (the emulator's account, a local directory), as a URL
    /// writes them (percent-encoded).
    prefix: Vec<String>,
    container: ContainerIn,
}

impl Root {
    fn of(url: &Url, container: ContainerIn) -> Root {
        Root {
            scheme: url.scheme().to_owned(),
            host: url.host_str().map(str::to_ascii_lowercase),
            port: url.port_or_known_default(),
            prefix: segments(url),
            container,
        }
    }

    fn describe(&self, configured: Option<&str>) -> String {
        let authority = match (&self.host, self.port) {
            (None, _) => String::new(),
            (Some(h), Some(p)) if Some(p) != default_port(&self.scheme) => format!("{h}:{p}"),
            (Some(h), _) => h.clone(),
        };
        let mut text = format!("{}://{authority}", self.scheme);
        for s in &self.prefix {
            text.push('/');
            text.push_str(s);
        }
        if let ContainerIn::Path = self.container {
            text.push('/');
            text.push_str(configured.unwrap_or("<container>"));
        }
        text.push_str("/…");
        text
    }

    fn matches(&self, url: &Url) -> bool {
        if url.scheme() != self.scheme {
            return false;
        }
        match &self.host {
            None => url.host_str().is_none_or(|h| h.is_empty() || h.eq_ignore_ascii_case("localhost")),
            Some(host) => {
                url.host_str().is_some_and(|h| h.eq_ignore_ascii_case(host)) && url.port_or_known_default() == self.port
            }
        }
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The non-empty path segments of a URL, as written (percent-encoded).
fn segments(url: &Url) -> Vec<String> {
    url.path_segments().map(|s| s.filter(|s| !s.is_empty()).map(str::to_owned).collect()).unwrap_or_default()
}

/// The URL rule of one configured store.
#[derive(Debug, Clone)]
pub struct Locator {
    roots: Vec<Root>,
    /// The configured container or bucket; `None`: any container (Azure only).
    container: Option<String>,
}

impl Locator {
    /// Azure Blob Storage: `<blob endpoint>/<container>/<blob>`.
    pub fn azure(blob_endpoint: &Url, container: Option<&str>) -> Locator {
        Locator { roots: vec![Root::of(blob_endpoint, ContainerIn::Path)], container: container.map(str::to_owned) }
    }

    /// S3: `s3://<bucket>/<key>`, and either `<endpoint>/<bucket>/<key>` for an S3-compatible
    /// service or Amazon's `https://<bucket>.s3[.<region>].amazonaws.com/<key>` and
    /// `https://s3[.<region>].amazonaws.com/<bucket>/<key>`.
    pub fn s3(bucket: &str, region: Option<&str>, endpoint: Option<&Url>) -> Locator {
        let fixed = || ContainerIn::Fixed(bucket.to_owned());
        let mut roots = vec![root("s3", bucket, fixed())];
        match endpoint {
            Some(endpoint) => roots.push(Root::of(endpoint, ContainerIn::Path)),
            None => {
                let mut hosts = vec!["s3.amazonaws.com".to_owned()];
                if let Some(region) = region {
                    hosts.push(format!("s3.{region}.amazonaws.com"));
                }
                for host in hosts {
                    roots.push(root("https", &format!("{bucket}.{host}"), fixed()));
                    roots.push(root("https", &host, ContainerIn::Path));
                }
            }
        }
        Locator { roots, container: Some(bucket.to_owned()) }
    }

    /// Google Cloud Storage: `gs://<bucket>/<object>` and `https://storage.googleapis.com/<bucket>/<object>`.
    pub fn gcs(bucket: &str) -> Locator {
        Locator {
            roots: vec![
                root("gs", bucket, ContainerIn::Fixed(bucket.to_owned())),
                root("https", "storage.googleapis.com", ContainerIn::Path),
            ],
            container: Some(bucket.to_owned()),
        }
    }

    /// Local files: `file:///<directory>/<file>`; `directory` must be absolute (canonical).
    pub fn local(directory: &std::path::Path) -> Result<Locator, String> {
        let url = Url::from_directory_path(directory)
            .map_err(|()| format!("`{}` is not an absolute directory path", directory.display()))?;
        Ok(Locator { roots: vec![Root::of(&url, ContainerIn::Fixed(String::new()))], container: None })
    }

    /// The blob `data_ref` names, or why it is refused (a sentence fragment: "is …").
    pub fn resolve(&self, data_ref: &str) -> Result<BlobRef, String> {
        let text = data_ref.trim();
        if text.chars().any(|c| c == '\\' || c.is_control() || c.is_whitespace()) {
            return Err("contains a backslash, a space or a control character".into());
        }
        check_raw_segments(text)?;
        let url = Url::parse(text).map_err(|e| format!("is not a URL ({e})"))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err("has a query string or fragment; only plain blob URLs are fetched (the bridge uses its own credentials)".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("names a user or password; only plain blob URLs are fetched".into());
        }
        let Some(root) = self.roots.iter().find(|r| r.matches(&url)) else {
            return Err(format!("is outside the configured storage: only {} are fetched", self.describe()));
        };
        let mut rest = segments(&url).into_iter();
        for expected in &root.prefix {
            if rest.next().as_deref() != Some(expected.as_str()) {
                return Err(format!(
                    "is outside the configured account or directory: only {} are fetched",
                    self.describe()
                ));
            }
        }
        let container = match &root.container {
            ContainerIn::Fixed(c) => c.clone(),
            ContainerIn::Path => {
                let named = rest.next().ok_or("names no container")?;
                match &self.container {
                    Some(configured) if *configured != named => {
                        return Err(format!("is in container `{named}`, not in the configured `{configured}`"));
                    }
                    _ => {}
                }
                if !valid_container(&named) {
                    return Err(format!("names `{named}`, which is not a container name"));
                }
                named
            }
        };
        let name = rest.collect::<Vec<_>>().join("/");
        if name.is_empty() {
            return Err("names no blob after the container".into());
        }
        let path = Path::from_url_path(&name).map_err(|e| format!("does not name a blob ({e})"))?;
        if path.as_ref().len() > MAX_NAME_BYTES {
            return Err(format!("names a blob longer than {MAX_NAME_BYTES} bytes, which no storage holds"));
        }
        Ok(BlobRef { container, path })
    }

    fn describe(&self) -> String {
        let forms: Vec<String> =
            self.roots.iter().map(|r| format!("`{}`", r.describe(self.container.as_deref()))).collect();
        format!("URLs {}", forms.join(" or "))
    }
}

fn root(scheme: &str, host: &str, container: ContainerIn) -> Root {
    Root {
        scheme: scheme.into(),
        host: Some(host.to_ascii_lowercase()),
        port: default_port(scheme),
        prefix: Vec::new(),
        container,
    }
}

/// Refuses `.`/`..` segments (also percent-encoded) and encoded `/` in the path as written, before
/// URL parsing normalizes them away.
fn check_raw_segments(text: &str) -> Result<(), String> {
    let after_scheme = text.split_once("://").map(|(_, rest)| rest).unwrap_or(text);
    let path = after_scheme.split(['?', '#']).next().unwrap_or_default();
    // The first segment is the authority (empty for `file:///`).
    for raw in path.split('/').skip(1) {
        let decoded = percent_decode_str(raw).decode_utf8_lossy();
        if decoded == "." || decoded == ".." {
            return Err("has a `.` or `..` segment; a blob URL may not climb out of its container".into());
        }
        if decoded.contains(['/', '\\']) || decoded.chars().any(char::is_control) {
            return Err("has an encoded `/`, `\\` or control character in its path".into());
        }
    }
    Ok(())
}

/// An Azure container (or S3/GCS bucket) name: 3 to 63 of a-z, 0-9, `-`, `.`, `_`.
fn valid_container(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azurite(container: Option<&str>) -> Locator {
        Locator::azure(&Url::parse("http://127.0.0.1:10000/devstoreaccount1").unwrap(), container)
    }

    #[test]
    fn blobs_in_the_configured_account_and_container_resolve() {
        let locator = azurite(Some("plans"));
        let blob = locator.resolve("http://127.0.0.1:10000/devstoreaccount1/plans/2024/plan%20one.json").unwrap();
        assert_eq!(blob.container, "plans");
        assert_eq!(blob.path.as_ref(), "2024/plan one.json");
        let cloud = Locator::azure(&Url::parse("https://acc.blob.core.windows.net").unwrap(), Some("plans"));
        assert_eq!(
            cloud.resolve("https://ACC.blob.core.windows.net:443/plans/p.json").unwrap().path.as_ref(),
            "p.json"
        );
        // Without a configured container, any container of the account.
        assert_eq!(
            azurite(None).resolve("http://127.0.0.1:10000/devstoreaccount1/other/p").unwrap().container,
            "other"
        );
    }

    #[test]
    fn every_url_outside_is_refused_with_the_reason() {
        let locator = azurite(Some("plans"));
        for (url, fragment) in [
            ("http://127.0.0.2:10000/devstoreaccount1/plans/p", "outside the configured storage"),
            ("http://localhost:10000/devstoreaccount1/plans/p", "outside the configured storage"),
            ("http://127.0.0.1:10001/devstoreaccount1/plans/p", "outside the configured storage"),
            ("https://127.0.0.1:10000/devstoreaccount1/plans/p", "outside the configured storage"),
            ("ftp://127.0.0.1:10000/devstoreaccount1/plans/p", "outside the configured storage"),
            ("file:///etc/passwd", "outside the configured storage"),
            ("http://127.0.0.1:10000/otheraccount/plans/p", "outside the configured account"),
            ("http://127.0.0.1:10000/devstoreaccount1/other/p", "container `other`"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans/../other/p", "`..`"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans/%2e%2E/other/p", "`..`"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans/./p", "`..`"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans/a%2F..%2Fb", "encoded"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans\\..\\other\\p", "backslash"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans/p?sig=abc", "query string"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans/p#x", "fragment"),
            ("http://user:pw@127.0.0.1:10000/devstoreaccount1/plans/p", "user or password"),
            ("http://127.0.0.1:10000/devstoreaccount1/plans/", "no blob"),
            ("http://127.0.0.1:10000/devstoreaccount1", "no container"),
            ("not a url", "space"),
            ("plans/p", "not a URL"),
            (&*format!("http://127.0.0.1:10000/devstoreaccount1/plans/{}", "a".repeat(1025)), "longer than 1024"),
        ] {
            let err = locator.resolve(url).expect_err(url);
            assert!(err.contains(fragment), "{url}: `{err}` should mention `{fragment}`");
        }
    }

    #[test]
    fn s3_urls_of_the_bucket_resolve_and_others_are_refused() {
        let locator = Locator::s3("plans", Some("eu-west-1"), None);
        for url in [
            "s3://plans/a/p.json",
            "https://plans.s3.eu-west-1.amazonaws.com/a/p.json",
            "https://plans.s3.amazonaws.com/a/p.json",
            "https://s3.eu-west-1.amazonaws.com/plans/a/p.json",
        ] {
            let blob = locator.resolve(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!((blob.container.as_str(), blob.path.as_ref()), ("plans", "a/p.json"), "{url}");
        }
        for url in [
            "s3://other/a/p.json",
            "https://other.s3.eu-west-1.amazonaws.com/a/p.json",
            "https://s3.eu-west-1.amazonaws.com/other/a/p.json",
            "https://plans.s3.us-east-1.amazonaws.com/a/p.json",
            "http://plans.s3.amazonaws.com/a/p.json",
            "s3://plans/a/../../x",
        ] {
            assert!(locator.resolve(url).is_err(), "{url} must be refused");
        }
        let minio = Locator::s3("plans", None, Some(&Url::parse("http://127.0.0.1:9000").unwrap()));
        assert_eq!(minio.resolve("http://127.0.0.1:9000/plans/p").unwrap().path.as_ref(), "p");
        assert!(minio.resolve("https://plans.s3.amazonaws.com/p").is_err());
        assert!(minio.resolve("http://127.0.0.1:9000/other/p").is_err());
    }

    #[test]
    fn gcs_urls_of_the_bucket_resolve_and_others_are_refused() {
        let locator = Locator::gcs("plans");
        assert_eq!(locator.resolve("gs://plans/a/p.json").unwrap().path.as_ref(), "a/p.json");
        assert_eq!(locator.resolve("https://storage.googleapis.com/plans/a/p.json").unwrap().path.as_ref(), "a/p.json");
        for url in
            ["gs://other/p", "https://storage.googleapis.com/other/p", "https://evil.example/plans/p", "s3://plans/p"]
        {
            assert!(locator.resolve(url).is_err(), "{url} must be refused");
        }
    }

    #[test]
    fn local_files_under_the_directory_resolve_and_others_are_refused() {
        let locator = Locator::local(std::path::Path::new("/srv/claims")).unwrap();
        assert_eq!(locator.resolve("file:///srv/claims/a/p.json").unwrap().path.as_ref(), "a/p.json");
        assert_eq!(locator.resolve("file://localhost/srv/claims/p.json").unwrap().path.as_ref(), "p.json");
        for url in [
            "file:///srv/claims/../secret",
            "file:///srv/claimsx/p.json",
            "file:///etc/passwd",
            "file://otherhost/srv/claims/p.json",
            "file:///srv/claims/",
        ] {
            assert!(locator.resolve(url).is_err(), "{url} must be refused");
        }
        assert!(Locator::local(std::path::Path::new("relative")).is_err());
    }
}
