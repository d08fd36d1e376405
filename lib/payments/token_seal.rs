//! Sealed payment tokens: the edge encrypts the buyer's PSP token (AES-256-GCM) before it
//! enters the saga, and only the authorize step opens it. Whatever keeps a copy for days (the
//! stream, the reserve step's inbox row, the outbox row, a dead letter) holds ciphertext, and
//! dropping an old key from `payments.token_keys` shreds every copy sealed with it.
//!
//! A sealed token reads `sealed1.<key id>.<hex(nonce ‖ ciphertext ‖ tag)>`, the key id being
//! the first 8 hex digits of the key's SHA-256. With no key configured tokens travel as given
//! (development); a token without the prefix is passed through on the way out, so events
//! published before keys were configured still authorize.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

const PREFIX: &str = "sealed1.";

/// Why a token cannot be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("payments.token_keys: each key is 64 hex digits (32 bytes), comma-separated")]
    BadKey,
    #[error("sealed with key {0}, which is no longer configured (shredded)")]
    UnknownKey(String),
    #[error("the sealed token is malformed or was tampered with")]
    Corrupt,
    #[error("no randomness for a nonce")]
    Random,
}

/// The keys of `payments.token_keys`: the first seals, every one opens.
pub struct TokenSeal {
    keys: Vec<(String, LessSafeKey)>,
    random: SystemRandom,
}

impl std::fmt::Debug for TokenSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        // Key ids only: the keys themselves never print.
        f.debug_struct("TokenSeal")
            .field("keys", &ids)
            .finish_non_exhaustive()
    }
}

impl TokenSeal {
    /// Reads comma-separated hex keys, newest first; empty: tokens are not sealed.
    pub fn new(keys: &str) -> Result<Self, SealError> {
        let mut parsed = Vec::new();
        for hex_key in keys.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let bytes = hex::decode(hex_key).map_err(|_| SealError::BadKey)?;
            if bytes.len() != 32 {
                return Err(SealError::BadKey);
            }
            let id = hex::encode(&Sha256::digest(&bytes)[..4]);
            let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SealError::BadKey)?;
            parsed.push((id, LessSafeKey::new(key)));
        }
        Ok(Self {
            keys: parsed,
            random: SystemRandom::new(),
        })
    }

    /// Whether tokens are sealed at all.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The token as it may travel: sealed with the newest key, or as given without keys.
    pub fn seal(&self, token: &str) -> Result<String, SealError> {
        let Some((id, key)) = self.keys.first() else {
            return Ok(token.to_owned());
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut data = token.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id.as_bytes()),
            &mut data,
        )
        .map_err(|_| SealError::Corrupt)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{PREFIX}{id}.{}", hex::encode(out)))
    }

    /// The token as the provider needs it. A token that was never sealed is returned as is.
    pub fn open(&self, travelling: &str) -> Result<String, SealError> {
        let Some(rest) = travelling.strip_prefix(PREFIX) else {
            return Ok(travelling.to_owned());
        };
        let (id, body) = rest.split_once('.').ok_or(SealError::Corrupt)?;
        let key = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, key)| key)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let bytes = hex::decode(body).map_err(|_| SealError::Corrupt)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Corrupt);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Corrupt)?;
        let mut data = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut data)
            .map_err(|_| SealError::Corrupt)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn a_sealed_token_opens_only_while_its_key_is_configured() {
        let old = TokenSeal::new(OLD).expect("key");
        let sealed = old.seal("tok_visa").expect("sealed");
        assert!(sealed.starts_with("sealed1.") && !sealed.contains("tok_visa"));
        assert_ne!(
            sealed,
            old.seal("tok_visa").expect("sealed"),
            "a fresh nonce each time"
        );
        // Rotation: the new key seals, the old one still opens what it sealed.
        let rotated = TokenSeal::new(&format!("{NEW},{OLD}")).expect("keys");
        assert_eq!(rotated.open(&sealed).expect("opens"), "tok_visa");
        let resealed = rotated.seal("tok_visa").expect("sealed");
        assert_ne!(resealed.split('.').nth(1), sealed.split('.').nth(1));
        // Dropping the old key shreds its tokens.
        let shredded = TokenSeal::new(NEW).expect("key");
        assert!(matches!(
            shredded.open(&sealed),
            Err(SealError::UnknownKey(_))
        ));
        assert_eq!(shredded.open(&resealed).expect("opens"), "tok_visa");
    }

    #[test]
    fn tampering_and_bad_keys_are_refused_and_unsealed_tokens_pass() {
        let seal = TokenSeal::new(OLD).expect("key");
        let sealed = seal.seal("tok_visa").expect("sealed");
        let mut tampered = sealed.clone();
        let last = tampered
            .pop()
            .map_or('0', |c| if c == '0' { '1' } else { '0' });
        tampered.push(last);
        assert_eq!(seal.open(&tampered), Err(SealError::Corrupt));
        assert_eq!(seal.open("tok_visa").expect("passes"), "tok_visa");
        assert_eq!(TokenSeal::new("abcd").err(), Some(SealError::BadKey));
        assert!(!TokenSeal::new("").expect("none").enabled());
        assert_eq!(
            TokenSeal::new("")
                .expect("none")
                .seal("tok_x")
                .expect("as is"),
            "tok_x"
        );
    }
}
