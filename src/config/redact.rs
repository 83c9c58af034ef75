//! Hiding secrets in text that is logged or shown: URLs with passwords, Azure connection strings.

/// The placeholder written instead of a secret.
pub const HIDDEN: &str = "***";

/// Names of `key=value` parts of a connection string whose value is a secret (compared without case).
const SECRET_PARTS: &[&str] = &["AccountKey", "SharedAccessKey", "SharedAccessSignature", "Password", "Pwd", "sig"];

/// Names of URL query parameters whose value is a secret (compared without case).
const SECRET_QUERY: &[&str] = &["password", "sslpassword", "sig", "sharedaccesskey", "accountkey"];

/// Returns `text` with its secrets replaced by `***`, leaving the rest exactly as written:
/// - the password of a URL (`postgres://user:pw@host/db`, `amqps://user:pw@host`);
/// - secret query parameters (`?password=…`, a SAS `sig=…`);
/// - `AccountKey`, `SharedAccessKey`, `SharedAccessSignature` and `Password` parts of an Azure or
///   ADO-style connection string (`Endpoint=sb://…;SharedAccessKeyName=x;SharedAccessKey=…`).
///
/// Text with none of these is returned unchanged.
pub fn redact_url(text: &str) -> String {
    if let Some(scheme_end) = text.find("://") {
        let head = &text[..scheme_end + 3];
        let rest = &text[scheme_end + 3..];
        // A connection string can start with `Endpoint=sb://`: it has `;`-separated parts.
        if !head.contains(';') && !rest.contains(';') {
            return format!("{head}{}", redact_authority_and_query(rest));
        }
    }
    redact_parts(text)
}

fn redact_authority_and_query(rest: &str) -> String {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // A password with a raw `/` or `?` pushes the `@` past the first delimiter.
    let at = rest[..authority_end].rfind('@').or_else(|| rest.rfind('@'));
    let (userinfo_redacted, after) = match at {
        Some(at) => {
            let userinfo = &rest[..at];
            let redacted = match userinfo.find(':') {
                Some(colon) => format!("{}:{HIDDEN}@", &userinfo[..colon]),
                None => format!("{userinfo}@"),
            };
            (redacted, &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    let after = match after.find('?') {
        Some(q) => {
            let (path, query) = after.split_at(q + 1);
            let (query, fragment) = match query.find('#') {
                Some(h) => query.split_at(h),
                None => (query, ""),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if SECRET_QUERY.iter().any(|s| s.eq_ignore_ascii_case(k)) => format!("{k}={HIDDEN}"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}{}{fragment}", query.join("&"))
        }
        None => after.to_owned(),
    };
    format!("{userinfo_redacted}{after}")
}

fn redact_parts(text: &str) -> String {
    text.split(';')
        .map(|part| match part.split_once('=') {
            Some((k, _)) if SECRET_PARTS.iter().any(|s| s.eq_ignore_ascii_case(k.trim())) => format!("{k}={HIDDEN}"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(redact_url("postgres://user:s3cret@db:5432/fhir"), "postgres://user:***@db:5432/fhir");
        assert_eq!(redact_url("amqps://guest:p%40ss@rabbit/vhost"), "amqps://guest:***@rabbit/vhost");
        assert_eq!(redact_url("postgres://user:pa/ss@db/fhir"), "postgres://user:***@db/fhir");
        assert_eq!(
            redact_url("postgres://db/fhir?user=u&password=pw&sslmode=require"),
            "postgres://db/fhir?user=u&password=***&sslmode=require"
        );
        assert_eq!(redact_url("postgres://user@db/fhir"), "postgres://user@db/fhir");
        assert_eq!(redact_url("sqlite://data/fhir-pubsub.db"), "sqlite://data/fhir-pubsub.db");
        assert_eq!(redact_url("localhost"), "localhost");
    }

    #[test]
    fn connection_string_keys_are_hidden() {
        let sb = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=abc=";
        assert_eq!(
            redact_url(sb),
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=***"
        );
        let blob =
            "DefaultEndpointsProtocol=https;AccountName=acc;AccountKey=Zm9v+YmFy==;EndpointSuffix=core.windows.net";
        let hidden = redact_url(blob);
        assert!(!hidden.contains("Zm9v"), "{hidden}");
        assert!(hidden.contains("AccountName=acc;AccountKey=***;"), "{hidden}");
    }
}
