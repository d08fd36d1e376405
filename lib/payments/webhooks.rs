//! Provider webhooks, taken in safely: the signature over the raw body is checked before
//! anything is parsed (Stripe's scheme: `Psp-Signature: t=<unix seconds>,v1=<hex
//! HMAC-SHA256 of "<t>.<body>">`), in constant time, against every configured secret (a
//! rotation keeps the old one until the provider signs with the new), with a tolerance on `t`
//! so that a captured delivery cannot be replayed later.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ring::hmac;
use rust_decimal::Decimal;
use serde::Deserialize;
use uuid::Uuid;

use crate::saga::events::ProviderUpdate;

/// The header the provider signs with.
pub const SIGNATURE_HEADER: &str = "Psp-Signature";

/// Why a delivery was refused; each is a 4xx with its own code, and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no webhook secret is configured (psp.webhook_secrets)")]
    NotConfigured,
    #[error("the Psp-Signature header is missing")]
    Missing,
    #[error("the Psp-Signature header is not t=<unix seconds>,v1=<hex>")]
    Malformed,
    #[error("the signed timestamp is {0} s away from our clock (tolerance {1} s)")]
    Stale(i64, u64),
    #[error("no v1 signature matches a configured secret")]
    Invalid,
    #[error("the payload is not a provider event: {0}")]
    Payload(String),
}

impl Refused {
    /// The error code the API answers with (and the metric's result label).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotConfigured => "webhooks_not_configured",
            Self::Missing => "signature_missing",
            Self::Malformed => "signature_malformed",
            Self::Stale(..) => "timestamp_out_of_tolerance",
            Self::Invalid => "signature_invalid",
            Self::Payload(_) => "invalid_payload",
        }
    }

    /// Whether it is about who sent it (401) rather than what was sent (400).
    pub fn is_authentication(&self) -> bool {
        matches!(self, Self::NotConfigured | Self::Stale(..) | Self::Invalid)
    }
}

/// Each configured provider's verifier, by the name in its webhook route.
pub struct Verifiers(Vec<(String, WebhookVerifier)>);

impl Verifiers {
    /// The primary's (`psp.webhook_secrets`) and, with a fallback, the fallback's
    /// (`psp.fallback_webhook_secrets`, or the primary's when empty).
    pub fn from_settings(psp: &crate::config::PspSettings) -> Self {
        let primary = WebhookVerifier::new(psp.webhook_secrets.expose(), psp.webhook_tolerance);
        let mut all = vec![(super::sandbox_client::NAME.to_owned(), primary)];
        if !psp.fallback_url.is_empty() {
            let secrets = match psp.fallback_webhook_secrets.expose() {
                "" => psp.webhook_secrets.expose(),
                own => own,
            };
            all.push((
                psp.fallback_name.clone(),
                WebhookVerifier::new(secrets, psp.webhook_tolerance),
            ));
        }
        Self(all)
    }

    /// The verifier of the provider named `provider`, if it is configured.
    pub fn of(&self, provider: &str) -> Option<&WebhookVerifier> {
        self.0.iter().find(|(n, _)| n == provider).map(|(_, v)| v)
    }
}

/// Checks deliveries against the configured secrets.
pub struct WebhookVerifier {
    keys: Vec<hmac::Key>,
    tolerance: Duration,
}

impl WebhookVerifier {
    /// From `psp.webhook_secrets` (comma-separated) and `psp.webhook_tolerance`.
    pub fn new(secrets: &str, tolerance: Duration) -> Self {
        let keys = secrets
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_bytes()))
            .collect();
        Self { keys, tolerance }
    }

    /// Whether any secret is configured.
    pub fn configured(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Verifies `header` over `body` at `now`.
    pub fn verify(
        &self,
        header: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), Refused> {
        if self.keys.is_empty() {
            return Err(Refused::NotConfigured);
        }
        let header = header.ok_or(Refused::Missing)?;
        let (timestamp, signatures) = parse_header(header)?;
        let skew = now.timestamp() - timestamp;
        if skew.unsigned_abs() > self.tolerance.as_secs() {
            return Err(Refused::Stale(skew, self.tolerance.as_secs()));
        }
        let mut signed = Vec::with_capacity(body.len() + 12);
        signed.extend_from_slice(timestamp.to_string().as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(body);
        // ring compares in constant time; every key is tried whatever the first answered.
        let matched = self
            .keys
            .iter()
            .flat_map(|key| signatures.iter().map(move |sig| (key, sig)))
            .fold(false, |found, (key, sig)| {
                hmac::verify(key, &signed, sig).is_ok() | found
            });
        if matched {
            Ok(())
        } else {
            Err(Refused::Invalid)
        }
    }
}

/// `t=<unix seconds>,v1=<hex>[,v1=<hex>...]`; other schemes are ignored, as Stripe's are.
fn parse_header(header: &str) -> Result<(i64, Vec<Vec<u8>>), Refused> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (name, value) = part.trim().split_once('=').ok_or(Refused::Malformed)?;
        match name {
            "t" => timestamp = Some(value.parse::<i64>().map_err(|_| Refused::Malformed)?),
            "v1" => signatures.push(hex::decode(value).map_err(|_| Refused::Malformed)?),
            _ => {}
        }
    }
    match timestamp {
        Some(t) if !signatures.is_empty() => Ok((t, signatures)),
        _ => Err(Refused::Malformed),
    }
}

/// A provider event as the provider sends it.
#[derive(Deserialize)]
struct Delivery {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    data: Data,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data {
    authorization_id: String,
    reference: String,
    amount: String,
    currency: String,
    #[serde(default)]
    decline_code: Option<String>,
}

/// A verified delivery, read: the order it is about and the update for the saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub order_id: Uuid,
    pub update: ProviderUpdate,
}

/// Reads a verified body (`provider` is the route's name for who sent it).
pub fn parse(provider: &str, body: &[u8]) -> Result<Received, Refused> {
    let delivery: Delivery =
        serde_json::from_slice(body).map_err(|e| Refused::Payload(e.to_string()))?;
    let bad = |what: &str| Refused::Payload(what.to_owned());
    let short = |s: &str| !s.is_empty() && s.len() <= 255;
    if !short(&delivery.id)
        || !short(&delivery.event_type)
        || !short(&delivery.data.authorization_id)
    {
        return Err(bad(
            "id, type and data.authorizationId are 1 to 255 characters",
        ));
    }
    let order_id = Uuid::parse_str(&delivery.data.reference)
        .map_err(|_| bad("data.reference is not one of our order ids"))?;
    let amount = delivery
        .data
        .amount
        .parse::<Decimal>()
        .map_err(|_| bad("data.amount is not a decimal string"))?;
    let currency = delivery.data.currency.to_ascii_uppercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(bad("data.currency is not an ISO 4217 code"));
    }
    Ok(Received {
        order_id,
        update: ProviderUpdate {
            provider: provider.to_owned(),
            event_id: delivery.id,
            event_type: delivery.event_type,
            auth_id: delivery.data.authorization_id,
            amount,
            currency,
            decline_code: delivery
                .data
                .decline_code
                .map(|c| c.chars().take(100).collect()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let mut signed = t.to_string().into_bytes();
        signed.push(b'.');
        signed.extend_from_slice(body);
        format!("t={t},v1={}", hex::encode(hmac::sign(&key, &signed)))
    }

    const BODY: &[u8] = br#"{"id":"evt_1","type":"authorization.succeeded","created":1,"data":{"authorizationId":"auth_1","reference":"0190a5a4-0000-7000-8000-000000000001","amount":"12.50","currency":"usd","status":"authorized","declineCode":null}}"#;

    #[test]
    fn a_signature_by_any_configured_secret_within_tolerance_verifies() {
        let now = Utc::now();
        let t = now.timestamp();
        let verifier = WebhookVerifier::new("new-secret, old-secret", Duration::from_secs(300));
        assert_eq!(
            verifier.verify(Some(&sign("old-secret", t, BODY)), BODY, now),
            Ok(())
        );
        assert_eq!(
            verifier.verify(Some(&sign("new-secret", t - 299, BODY)), BODY, now),
            Ok(())
        );
        // Stripe sends one v1 per active secret: any of them may match.
        let both = format!("{},v1=00ff", sign("new-secret", t, BODY));
        assert_eq!(verifier.verify(Some(&both), BODY, now), Ok(()));
    }

    #[test]
    fn a_wrong_secret_an_old_timestamp_or_a_changed_body_is_refused() {
        let now = Utc::now();
        let t = now.timestamp();
        let verifier = WebhookVerifier::new("secret", Duration::from_secs(300));
        let header = sign("secret", t, BODY);
        assert_eq!(
            verifier.verify(Some(&sign("other", t, BODY)), BODY, now),
            Err(Refused::Invalid)
        );
        assert!(matches!(
            verifier.verify(Some(&sign("secret", t - 301, BODY)), BODY, now),
            Err(Refused::Stale(301, 300))
        ));
        let mut changed = BODY.to_vec();
        changed[10] ^= 1;
        assert_eq!(
            verifier.verify(Some(&header), &changed, now),
            Err(Refused::Invalid)
        );
        assert_eq!(verifier.verify(None, BODY, now), Err(Refused::Missing));
        assert_eq!(
            verifier.verify(Some("v1=zz"), BODY, now),
            Err(Refused::Malformed)
        );
        assert_eq!(
            verifier.verify(Some(&format!("t={t}")), BODY, now),
            Err(Refused::Malformed)
        );
        let none = WebhookVerifier::new("", Duration::from_secs(300));
        assert_eq!(
            none.verify(Some(&header), BODY, now),
            Err(Refused::NotConfigured)
        );
    }

    #[test]
    fn a_verified_body_reads_as_an_update_for_its_order() {
        let received = parse("sandbox", BODY).expect("parses");
        assert_eq!(
            received.order_id.to_string(),
            "0190a5a4-0000-7000-8000-000000000001"
        );
        assert_eq!(received.update.amount, Decimal::new(1250, 2));
        assert_eq!(received.update.currency, "USD");
        assert_eq!(received.update.event_type, "authorization.succeeded");
        assert!(matches!(parse("sandbox", b"{}"), Err(Refused::Payload(_))));
        let not_ours =
            String::from_utf8_lossy(BODY).replace("0190a5a4-0000-7000-8000-000000000001", "ord_1");
        assert!(matches!(
            parse("sandbox", not_ours.as_bytes()),
            Err(Refused::Payload(_))
        ));
    }
}
