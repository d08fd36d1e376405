//! Standard Webhooks signatures (standardwebhooks.com): `webhook-signature` is `v1,` and the
//! base64 HMAC-SHA256 of `"<webhook-id>.<webhook-timestamp>.<body>"`, keyed with the secret's
//! bytes (the base64 after `whsec_`). During a rotation's overlap a message carries one
//! signature per live secret, space-separated, so a receiver on either secret accepts it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

const PREFIX: &str = "whsec_";

/// A secret that is not `whsec_` and base64.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a webhook secret is whsec_ followed by base64")]
pub struct BadSecret;

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> Result<String, BadSecret> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| BadSecret)?;
    Ok(format!("{PREFIX}{}", STANDARD.encode(bytes)))
}

/// The live secrets of an endpoint as HMAC keys, decoded once and used for every message.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<hmac::Key>,
}

impl Signer {
    /// Keys for every secret given (the current one, and the previous one during a rotation).
    pub fn new(secrets: &[&str]) -> Result<Self, BadSecret> {
        let keys = secrets
            .iter()
            .map(|secret| {
                let raw = secret.strip_prefix(PREFIX).ok_or(BadSecret)?;
                let bytes = STANDARD.decode(raw).map_err(|_| BadSecret)?;
                Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
            })
            .collect::<Result<_, BadSecret>>()?;
        Ok(Signer { keys })
    }

    /// The `webhook-signature` header value for a message: one `v1,` signature per key.
    pub fn sign(&self, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
        // The signed text is fed in pieces: a copy of every body would cost more than its HMAC.
        let timestamp = timestamp.to_string();
        let mut out = String::with_capacity(self.keys.len() * 48);
        for key in &self.keys {
            let mut ctx = hmac::Context::with_key(key);
            for part in [
                webhook_id.as_bytes(),
                b".",
                timestamp.as_bytes(),
                b".",
                body,
            ] {
                ctx.update(part);
            }
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("v1,");
            STANDARD.encode_string(ctx.sign().as_ref(), &mut out);
        }
        out
    }
}

/// The `webhook-signature` header value for a message, signed with every secret given.
pub fn signature(
    secrets: &[&str],
    webhook_id: &str,
    timestamp: i64,
    body: &str,
) -> Result<String, BadSecret> {
    Ok(Signer::new(secrets)?.sign(webhook_id, timestamp, body.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specifications_example() {
        // The example in the Standard Webhooks specification's reference implementations.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        let sig = signature(
            &[secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            body,
        )
        .expect("signs");
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_rotation_signs_with_both_secrets_and_a_bad_secret_is_refused() {
        let a = new_secret().expect("secret");
        let b = new_secret().expect("secret");
        assert!(a.starts_with("whsec_") && a != b);
        let both = signature(&[&a, &b], "msg_1", 1, "{}").expect("signs");
        assert_eq!(both.split(' ').count(), 2);
        assert_eq!(signature(&["nope"], "msg_1", 1, "{}"), Err(BadSecret));
    }
}
