//! Bearer tokens: HS256 JWTs with `sub`, `exp` and optional `roles: ["admin"]`.

use std::time::Duration;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

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
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token subject must be 1 to 128 characters without control characters")]
    BadSubject,
    #[error("system clock before 1970")]
    Clock,
}

/// Mints a token (the `checkout token` command and tests).
pub fn mint(secret: &str, user_id: &str, admin: bool, ttl: Duration) -> Result<String, AuthError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| AuthError::Clock)?;
    let claims = Claims {
        sub: user_id.to_owned(),
        exp: (now + ttl).as_secs(),
        roles: if admin { vec!["admin".into()] } else { vec![] },
    };
    Ok(encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Verifies signature and expiry.
pub fn verify(secret: &str, token: &str) -> Result<Principal, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )?;
    let sub = data.claims.sub;
    if sub.is_empty() || sub.len() > 128 || sub.chars().any(char::is_control) {
        return Err(AuthError::BadSubject);
    }
    Ok(Principal {
        admin: data.claims.roles.iter().any(|r| r == "admin"),
        user_id: sub,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_secret() {
        let token = mint("s3cret", "alice", true, Duration::from_secs(60)).expect("mint");
        let p = verify("s3cret", &token).expect("verify");
        assert_eq!(p.user_id, "alice");
        assert!(p.admin);
        assert!(verify("other", &token).is_err());
        assert!(verify("s3cret", "not.a.jwt").is_err());
    }
}
