//! The Service Bus connection string (`PubSub.MessageBroker.Host` when `BrokerType` is
//! `AzureServiceBus`): `Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…`.
//!
//! Parsed here so that a wrong one is refused when the settings load, naming what is missing and
//! never repeating the key. Keys are matched without regard to case; unknown keys are ignored, as
//! Microsoft's clients ignore them.

use std::fmt;

/// The parts of a Service Bus connection string the bridge uses.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceBusConnectionString {
    /// The namespace host from `Endpoint` (`ns.servicebus.windows.net`, `localhost`), without port.
    pub namespace: String,
    /// The port written in `Endpoint`, if any (an emulator published on another port); without
    /// one the client connects to 5672 (plain AMQP) or 5671 (TLS).
    pub port: Option<u16>,
    /// `SharedAccessKeyName` and `SharedAccessKey`, or `SharedAccessSignature`.
    pub credential: ServiceBusCredential,
    /// `UseDevelopmentEmulator=true`: Microsoft's convention for its emulator, which speaks plain
    /// AMQP (no TLS).
    pub use_development_emulator: bool,
}

/// How the bridge authenticates with Service Bus.
#[derive(Clone, PartialEq, Eq)]
pub enum ServiceBusCredential {
    /// A shared access key and its name.
    Key { name: String, key: String },
    /// A ready-made shared access signature.
    Signature(String),
}

impl fmt::Debug for ServiceBusCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceBusCredential::Key { name, .. } => f.debug_struct("Key").field("name", name).finish_non_exhaustive(),
            ServiceBusCredential::Signature(_) => f.write_str("Signature(***)"),
        }
    }
}

impl fmt::Debug for ServiceBusConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBusConnectionString")
            .field("namespace", &self.namespace)
            .field("port", &self.port)
            .field("credential", &self.credential)
            .field("use_development_emulator", &self.use_development_emulator)
            .finish()
    }
}

impl ServiceBusConnectionString {
    /// Parses a connection string; the error says what is wrong without quoting a secret.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut signature = None;
        let mut emulator = false;
        for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(format!(
                    "is not a Service Bus connection string (`Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`): \
                     a part has no `=` after `{}`",
                    pair.chars().take_while(|c| c.is_ascii_alphanumeric()).collect::<String>()
                ));
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.to_owned()),
                "sharedaccesskeyname" => key_name = Some(value.to_owned()),
                "sharedaccesskey" => key = Some(value.to_owned()),
                "sharedaccesssignature" => signature = Some(value.to_owned()),
                "usedevelopmentemulator" => emulator = value.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        let endpoint = endpoint.filter(|e| !e.is_empty()).ok_or_else(|| {
            "is not a Service Bus connection string: it has no `Endpoint=sb://<namespace>/` \
             (expected `Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`)"
                .to_owned()
        })?;
        let url = url::Url::parse(&endpoint).map_err(|e| format!("has an Endpoint that is not a URL ({e})"))?;
        if !url.scheme().eq_ignore_ascii_case("sb") {
            return Err(format!("has an Endpoint with scheme `{}`; it must start with `sb://`", url.scheme()));
        }
        let namespace = url.host_str().filter(|h| !h.is_empty()).ok_or("has an Endpoint without a namespace host")?;
        let credential = match (key_name.filter(|k| !k.is_empty()), key.filter(|k| !k.is_empty()), signature) {
            (_, _, Some(signature)) if !signature.is_empty() => ServiceBusCredential::Signature(signature),
            (Some(name), Some(key), _) => ServiceBusCredential::Key { name, key },
            (Some(_), None, _) => return Err("has a SharedAccessKeyName but no SharedAccessKey".to_owned()),
            (None, Some(_), _) => return Err("has a SharedAccessKey but no SharedAccessKeyName".to_owned()),
            (None, None, _) => {
                return Err(
                    "has no credential: give SharedAccessKeyName and SharedAccessKey, or SharedAccessSignature"
                        .to_owned(),
                );
            }
        };
        Ok(ServiceBusConnectionString {
            namespace: namespace.trim_matches(['[', ']']).to_owned(),
            port: url.port(),
            credential,
            use_development_emulator: emulator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_and_emulator_connection_strings_parse() {
        let azure = ServiceBusConnectionString::parse(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=abc=",
        )
        .unwrap();
        assert_eq!(azure.namespace, "ns.servicebus.windows.net");
        assert_eq!(
            azure.credential,
            ServiceBusCredential::Key { name: "RootManageSharedAccessKey".into(), key: "abc=".into() }
        );
        assert!(!azure.use_development_emulator);
        let emulator = ServiceBusConnectionString::parse(
            "endpoint=sb://localhost:5673;SharedAccessKeyName=Root;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
        )
        .unwrap();
        assert_eq!((emulator.namespace.as_str(), emulator.port), ("localhost", Some(5673)));
        assert!(emulator.use_development_emulator);
        let signature =
            ServiceBusConnectionString::parse("Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sr=x")
                .unwrap();
        assert!(matches!(signature.credential, ServiceBusCredential::Signature(_)));
    }

    #[test]
    fn wrong_connection_strings_say_what_is_missing_without_the_key() {
        let cases = [
            ("127.0.0.1", "no `=`"),
            ("SharedAccessKeyName=Root;SharedAccessKey=secret1", "no `Endpoint"),
            ("Endpoint=amqp://ns/;SharedAccessKeyName=Root;SharedAccessKey=secret1", "sb://"),
            ("Endpoint=sb://ns/;SharedAccessKeyName=Root", "no SharedAccessKey"),
            ("Endpoint=sb://ns/;SharedAccessKey=secret1", "no SharedAccessKeyName"),
            ("Endpoint=sb://ns/", "no credential"),
        ];
        for (text, expected) in cases {
            let error = ServiceBusConnectionString::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
            assert!(!error.contains("secret1"), "{text}: {error}");
        }
        let debug = format!(
            "{:?}",
            ServiceBusConnectionString::parse("Endpoint=sb://ns/;SharedAccessKeyName=R;SharedAccessKey=secret1")
                .unwrap()
        );
        assert!(!debug.contains("secret1"), "{debug}");
    }
}
