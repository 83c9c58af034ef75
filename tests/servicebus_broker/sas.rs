//! Checks the shared access signatures clients put to `$cbs`, as Service Bus does for a
//! namespace-level key: `SharedAccessSignature sig=<sig>&se=<expiry>&skn=<key name>&sr=<resource>`,
//! where `sig` is base64(HMAC-SHA256(key, "<url-encoded resource>\n<expiry>")).

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;

/// Why a token was refused (said back to the client in the put-token response).
pub fn verify(token: &str, key_name: &str, key: &str, now_unix: i64) -> Result<(), String> {
    let fields =
        token.strip_prefix("SharedAccessSignature ").ok_or_else(|| "not a SharedAccessSignature token".to_string())?;
    let (mut sig, mut expiry, mut name, mut resource) = (None, None, None, None);
    for pair in fields.split('&') {
        let (field, value) = pair.split_once('=').ok_or_else(|| format!("malformed token field {pair:?}"))?;
        match field.trim() {
            "sig" => sig = Some(value.trim()),
            "se" => expiry = Some(value.trim()),
            "skn" => name = Some(value.trim()),
            "sr" => resource = Some(value.trim()),
            _ => {}
        }
    }
    let (Some(sig), Some(expiry), Some(name), Some(resource)) = (sig, expiry, name, resource) else {
        return Err("the token lacks one of sig, se, skn, sr".into());
    };
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    if decode(name) != key_name {
        return Err(format!("unknown shared access key name {:?}", decode(name)));
    }
    let expires: i64 = decode(expiry).parse().map_err(|_| "the token's expiry is not a number".to_string())?;
    if expires <= now_unix {
        return Err("the token has expired".into());
    }
    // The signed string is the resource exactly as it stands (URL-encoded) in the token.
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).map_err(|e| e.to_string())?;
    mac.update(format!("{resource}\n{}", decode(expiry)).as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if decode(sig) != expected {
        return Err("the signature does not match the key".into());
    }
    Ok(())
}
