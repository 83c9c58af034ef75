//! Azure storage connection strings, as Firely's `AzureBlobStorageConnectionString` holds them.
//!
//! Read: `DefaultEndpointsProtocol`, `AccountName`, `AccountKey`, `EndpointSuffix`, `BlobEndpoint`,
//! `SharedAccessSignature`, and `UseDevelopmentStorage=true` (the emulator's well-known account on
//! `http://127.0.0.1:10000/devstoreaccount1`). Other parts (`QueueEndpoint`, …) are ignored. The
//! account key and the signature are secrets: no error message here quotes them.

use url::Url;

/// The emulator's well-known account (Azurite, the Azure Storage Emulator).
pub const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// The emulator's well-known account key: public, published in Microsoft's documentation.
const EMULATOR_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The emulator's blob endpoint with `UseDevelopmentStorage=true`.
const EMULATOR_BLOB_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

/// How the bridge signs its requests to the account.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// `AccountKey`: shared-key signatures.
    AccountKey(String),
    /// `SharedAccessSignature`: the SAS query pairs added to every request.
    Sas(Vec<(String, String)>),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::AccountKey(_) => f.write_str("AccountKey(***)"),
            Credential::Sas(_) => f.write_str("Sas(***)"),
        }
    }
}

/// A storage account as a connection string describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    /// The blob service's URL, without a trailing `/`: `https://acc.blob.core.windows.net`, or with
    /// the account in the path for the emulator (`http://127.0.0.1:10000/devstoreaccount1`).
    pub blob_endpoint: Url,
    pub credential: Credential,
}

/// Reads a connection string; the error says which part is missing or wrong (never a secret).
pub fn parse_connection_string(text: &str) -> Result<Account, String> {
    let mut parts: Vec<(String, String)> = Vec::new();
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            // Not quoted: a part without `=` may be a key pasted on its own.
            return Err("has a part without `=`; parts are `Name=value`, separated by `;`".into());
        };
        parts.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let get = |name: &str| parts.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());

    if get("usedevelopmentstorage").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        let endpoint = match get("developmentstorageproxyuri") {
            Some(proxy) => format!("{}/{EMULATOR_ACCOUNT}", proxy.trim_end_matches('/')),
            None => EMULATOR_BLOB_ENDPOINT.to_owned(),
        };
        return Ok(Account {
            name: EMULATOR_ACCOUNT.into(),
            blob_endpoint: endpoint_url(&endpoint)?,
            credential: Credential::AccountKey(EMULATOR_KEY.into()),
        });
    }

    let credential = match (get("accountkey"), get("sharedaccesssignature")) {
        (Some(key), _) if !key.is_empty() => Credential::AccountKey(key.to_owned()),
        (_, Some(sas)) if !sas.is_empty() => Credential::Sas(
            url::form_urlencoded::parse(sas.trim_start_matches('?').as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ),
        _ => return Err("needs an AccountKey or a SharedAccessSignature part".into()),
    };
    let blob_endpoint = match get("blobendpoint") {
        Some(endpoint) => endpoint_url(endpoint)?,
        None => {
            let account = get("accountname").ok_or("needs an AccountName part (or a BlobEndpoint)")?;
            let protocol = get("defaultendpointsprotocol").unwrap_or("https").to_ascii_lowercase();
            if protocol != "https" && protocol != "http" {
                return Err(format!("has DefaultEndpointsProtocol `{protocol}`; use https or http"));
            }
            let suffix = get("endpointsuffix").unwrap_or("core.windows.net");
            endpoint_url(&format!("{protocol}://{account}.blob.{suffix}"))?
        }
    };
    let name = match get("accountname") {
        Some(name) if !name.is_empty() => name.to_owned(),
        // A SAS connection string may name only the endpoint: the account is its first host label.
        _ => blob_endpoint
            .host_str()
            .and_then(|h| h.split('.').next())
            .filter(|h| !h.is_empty())
            .ok_or("needs an AccountName part")?
            .to_owned(),
    };
    if matches!(credential, Credential::AccountKey(_)) && get("accountname").is_none() {
        return Err("needs an AccountName part with its AccountKey".into());
    }
    Ok(Account { name, blob_endpoint, credential })
}

/// An endpoint URL, checked: http(s), a host, no query, no trailing `/` kept.
fn endpoint_url(text: &str) -> Result<Url, String> {
    let url =
        Url::parse(text.trim_end_matches('/')).map_err(|e| format!("has a BlobEndpoint that is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("has a BlobEndpoint `{url}` that is not an http(s) URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err("has a BlobEndpoint with a query, fragment or user; put a SAS in SharedAccessSignature".into());
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_storage_is_the_emulator_account() {
        let account = parse_connection_string("UseDevelopmentStorage=true").unwrap();
        assert_eq!(account.name, "devstoreaccount1");
        assert_eq!(account.blob_endpoint.as_str(), "http://127.0.0.1:10000/devstoreaccount1");
        assert!(matches!(account.credential, Credential::AccountKey(ref k) if k == EMULATOR_KEY));
    }

    #[test]
    fn account_key_strings_give_the_default_or_the_given_endpoint() {
        let account = parse_connection_string(
            "DefaultEndpointsProtocol=https;AccountName=acc;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )
        .unwrap();
        assert_eq!(account.blob_endpoint.as_str(), "https://acc.blob.core.windows.net/");
        assert_eq!(account.credential, Credential::AccountKey("a2V5".into()));
        let azurite = parse_connection_string(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:4711/devstoreaccount1/;",
        )
        .unwrap();
        assert_eq!(azurite.blob_endpoint.as_str(), "http://127.0.0.1:4711/devstoreaccount1");
    }

    #[test]
    fn sas_strings_take_the_account_from_the_endpoint() {
        let account = parse_connection_string(
            "BlobEndpoint=https://acc.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&sig=abc%2B",
        )
        .unwrap();
        assert_eq!(account.name, "acc");
        assert_eq!(
            account.credential,
            Credential::Sas(vec![("sv".into(), "2022-11-02".into()), ("sig".into(), "abc+".into())])
        );
    }

    #[test]
    fn incomplete_strings_are_refused_without_quoting_the_key() {
        for (text, fragment) in [
            ("AccountName=acc", "AccountKey or a SharedAccessSignature"),
            ("AccountKey=c2VjcmV0a2V5", "AccountName"),
            ("AccountName=a;AccountKey=c2VjcmV0a2V5;BlobEndpoint=ftp://x", "http(s)"),
            ("AccountName=a;AccountKey=c2VjcmV0a2V5;DefaultEndpointsProtocol=ftp", "DefaultEndpointsProtocol"),
            ("c2VjcmV0a2V5", "without `=`"),
        ] {
            let err = parse_connection_string(text).unwrap_err();
            assert!(err.contains(fragment), "{text}: {err}");
            assert!(!err.contains("c2VjcmV0a2V5"), "{err}");
        }
    }
}
