//! Bearer tokens: JWTs with `sub`, `exp` and optional `roles: ["admin"]`, signed HS256 with
//! `auth.jwt_secret` (development, service tokens) or RS256/ES256 by an identity provider whose
//! public keys are in `auth.jwks_file`. Issuer and audience are checked when configured.
//!
//! Safe by default: the edge refuses to start with the built-in development secret or a secret
//! shorter than 32 bytes; `./dev up` generates one into `.run/local.toml`.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use crate::config::AuthSettings;

/// The secret in the defaults file: fine for nothing but failing loudly.
pub const DEVELOPMENT_SECRET: &str = "dev-only-secret-change-me";
/// The shortest HS256 secret the edge accepts.
pub const MIN_SECRET_BYTES: usize = 32;

/// The caller, as the token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub admin: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token subject must be 1 to 128 characters without control characters")]
    BadSubject,
    #[error("tokens signed with {0:?} are not accepted here")]
    Algorithm(Algorithm),
    #[error("no key for this token (kid {0:?})")]
    UnknownKey(Option<String>),
    #[error("system clock before 1970")]
    Clock,
}

/// Why the token settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("auth.jwt_secret is the built-in development secret; set CHECKOUT__AUTH__JWT_SECRET to 32 random bytes or more (./dev up generates one)")]
    DevelopmentSecret,
    #[error("auth.jwt_secret is {0} bytes; it must be at least 32 (CHECKOUT__AUTH__JWT_SECRET)")]
    ShortSecret(usize),
    #[error("auth.jwks_file {path}: {reason}")]
    Jwks { path: String, reason: String },
    #[error("no way to verify tokens: set auth.jwt_secret or auth.jwks_file")]
    NoKeys,
}

/// Checks bearer tokens against the configured keys, issuer and audience.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    /// Public keys by `kid`, with the algorithm each is for.
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    issuer: Option<String>,
    audience: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.trim().is_empty()).then(|| s.trim().to_owned())
}

impl Verifier {
    /// Builds a verifier; refuses weak or missing keys.
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, AuthConfigError> {
        let secret = settings.jwt_secret.expose();
        let hs256 = match secret {
            "" => None,
            DEVELOPMENT_SECRET => return Err(AuthConfigError::DevelopmentSecret),
            s if s.len() < MIN_SECRET_BYTES => return Err(AuthConfigError::ShortSecret(s.len())),
            s => Some(DecodingKey::from_secret(s.as_bytes())),
        };
        let mut keys = HashMap::new();
        if let Some(path) = non_empty(&settings.jwks_file) {
            let err = |reason: String| AuthConfigError::Jwks {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
            let set: JwkSet = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    return Err(err("every key needs a kid".into()));
                };
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    _ => {
                        return Err(err(format!(
                            "key {kid}: only RSA (RS256) and EC P-256 (ES256) keys"
                        )))
                    }
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|e| err(format!("key {kid}: {e}")))?;
                keys.insert(kid, (key, alg));
            }
        }
        if hs256.is_none() && keys.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        Ok(Self {
            hs256,
            keys,
            issuer: non_empty(&settings.issuer),
            audience: non_empty(&settings.audience),
        })
    }

    /// Verifies signature, algorithm, expiry, and issuer and audience when configured.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = decode_header(token)?;
        let (key, alg) = match header.alg {
            Algorithm::HS256 => match &self.hs256 {
                Some(key) => (key, Algorithm::HS256),
                None => return Err(AuthError::Algorithm(header.alg)),
            },
            Algorithm::RS256 | Algorithm::ES256 => {
                let found = header.kid.as_ref().and_then(|kid| self.keys.get(kid));
                match found {
                    Some((key, alg)) if *alg == header.alg => (key, *alg),
                    _ => return Err(AuthError::UnknownKey(header.kid)),
                }
            }
            other => return Err(AuthError::Algorithm(other)),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = decode::<Claims>(token, key, &validation)?;
        let sub = data.claims.sub;
        if sub.is_empty() || sub.len() > 128 || sub.chars().any(char::is_control) {
            return Err(AuthError::BadSubject);
        }
        Ok(Principal {
            admin: data.claims.roles.iter().any(|r| r == "admin"),
            user_id: sub,
        })
    }
}

/// Mints an HS256 token (the `checkout token` command and tests), with the configured issuer
/// and audience when there are any.
pub fn mint(secret: &str, user_id: &str, admin: bool, ttl: Duration) -> Result<String, AuthError> {
    mint_with(secret, user_id, admin, ttl, None, None)
}

/// Mints an HS256 token with an issuer and an audience.
pub fn mint_with(
    secret: &str,
    user_id: &str,
    admin: bool,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| AuthError::Clock)?;
    let claims = Claims {
        sub: user_id.to_owned(),
        exp: (now + ttl).as_secs(),
        roles: if admin { vec!["admin".into()] } else { vec![] },
        iss: issuer.map(str::to_owned),
        aud: audience.map(str::to_owned),
    };
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Mints a token for the configured settings (issuer and audience included).
pub fn mint_for(
    settings: &AuthSettings,
    user_id: &str,
    admin: bool,
    ttl: Duration,
) -> Result<String, AuthError> {
    mint_with(
        settings.jwt_secret.expose(),
        user_id,
        admin,
        ttl,
        non_empty(&settings.issuer).as_deref(),
        non_empty(&settings.audience).as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn settings(secret: &str) -> AuthSettings {
        AuthSettings {
            jwt_secret: Secret::new(secret),
            jwks_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
        }
    }

    #[test]
    fn round_trip_and_wrong_secret() {
        let v = Verifier::from_settings(&settings(SECRET)).expect("verifier");
        let token = mint(SECRET, "alice", true, Duration::from_secs(60)).expect("mint");
        let p = v.verify(&token).expect("verify");
        assert_eq!(p.user_id, "alice");
        assert!(p.admin);
        let other = mint(&"x".repeat(32), "alice", true, Duration::from_secs(60)).expect("mint");
        assert!(v.verify(&other).is_err());
        assert!(v.verify("not.a.jwt").is_err());
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert!(matches!(
            Verifier::from_settings(&settings(DEVELOPMENT_SECRET)),
            Err(AuthConfigError::DevelopmentSecret)
        ));
        assert!(matches!(
            Verifier::from_settings(&settings("short")),
            Err(AuthConfigError::ShortSecret(5))
        ));
        assert!(matches!(
            Verifier::from_settings(&settings("")),
            Err(AuthConfigError::NoKeys)
        ));
    }
}
