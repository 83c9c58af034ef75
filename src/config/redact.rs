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

/// The secret values [`redact_url`] would hide in `text`: the password of a URL, secret query
/// parameters, secret parts of a connection string. As written (still percent-encoded).
pub fn secrets_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(scheme_end) = text.find("://")
        && !text.contains(';')
    {
        let rest = &text[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let at = rest[..authority_end].rfind('@').or_else(|| rest.rfind('@'));
        if let Some(at) = at
            && let Some((_, password)) = rest[..at].split_once(':')
        {
            found.push(password.to_owned());
        }
        if let Some(q) = rest.find('?') {
            let query = rest[q + 1..].split('#').next().unwrap_or_default();
            for (k, v) in query.split('&').filter_map(|pair| pair.split_once('=')) {
                if SECRET_QUERY.iter().any(|s| s.eq_ignore_ascii_case(k)) {
                    found.push(v.to_owned());
                }
            }
        }
        return found;
    }
    for (k, v) in text.split(';').filter_map(|part| part.split_once('=')) {
        if SECRET_PARTS.iter().any(|s| s.eq_ignore_ascii_case(k.trim())) {
            found.push(v.to_owned());
        }
    }
    found
}

/// Secrets shorter than this are not searched for in free text (a one-letter password would
/// blank out every occurrence of that letter); they are still hidden where the settings name them.
pub const MIN_SCRUBBED_LEN: usize = 4;

/// Hides known secret values wherever they appear in a text: in log lines, in error messages that a
/// library built from a URL, in what the HTTP endpoints show. Built from
/// [`crate::config::Settings::secrets`].
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    /// Longest first, so that a secret containing another is hidden whole.
    secrets: Vec<String>,
}

impl Scrubber {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Scrubber {
        let mut all: Vec<String> = Vec::new();
        for secret in secrets.into_iter().filter(|s| s.chars().count() >= MIN_SCRUBBED_LEN) {
            // As it appears inside a JSON string (JSON logs, /status) too.
            let escaped = serde_json::to_string(&secret).unwrap_or_default();
            let escaped = escaped.trim_matches('"').to_owned();
            for form in [secret, escaped] {
                if !all.contains(&form) {
                    all.push(form);
                }
            }
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Scrubber { secrets: all }
    }

    /// `text` with every known secret replaced by `***`.
    pub fn hide<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(text);
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(secret.as_str(), HIDDEN));
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
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
    fn secrets_in_urls_and_connection_strings_are_found() {
        assert_eq!(secrets_in("postgres://user:s3cret@db:5432/fhir"), vec!["s3cret"]);
        assert_eq!(secrets_in("postgres://db/fhir?user=u&password=pw&sslmode=require"), vec!["pw"]);
        assert!(secrets_in("postgres://user@db/fhir").is_empty());
        assert_eq!(secrets_in("Endpoint=sb://ns/;SharedAccessKeyName=n;SharedAccessKey=abc="), vec!["abc="]);
    }

    #[test]
    fn scrubber_hides_every_form_and_keeps_the_rest() {
        let scrubber = Scrubber::new(["pa\"ss".to_owned(), "longer-secret".to_owned(), "x".to_owned()]);
        assert_eq!(scrubber.hide("error: longer-secret refused"), "error: *** refused");
        assert_eq!(scrubber.hide(r#"{"msg":"pw pa\"ss"}"#), r#"{"msg":"pw ***"}"#);
        assert_eq!(scrubber.hide("x marks the spot"), "x marks the spot", "too short to search for");
        assert!(matches!(scrubber.hide("nothing here"), std::borrow::Cow::Borrowed(_)));
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
