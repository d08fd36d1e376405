//! The authorize step: hold the checkout's total at the provider, exactly once per order.
//!
//! Only an explicit decline is a decline. Provider trouble (timeouts, 5xx, 401/403/409/429)
//! is retried with the same idempotency key, and the order fails with `payment_unavailable`
//! only after `payments.max_attempts` failed calls spread over at least
//! `payments.retry_window`. Before failing an order whose outcome is unknown (we gave up, or
//! the provider refused the request itself), the provider's own records decide: an
//! authorization it holds for the order is ours and the checkout goes on with it.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::provider::{AuthorizeOutcome, AuthorizeRequest, PaymentProvider, ProviderError};
use super::providers::{Providers, Route};
use super::{idempotency_key, payment_id_for, PaymentStatus};
use crate::db::Leases;
use crate::saga::events::{Checkout, Event, EventKind, FailureReason};
use crate::saga::inbox::InboxTable;
use crate::saga::runner::StepError;
use crate::saga::{Delivery, Shape, Step, Tx};

/// Consumes `checkout.reserved`, emits `checkout.authorized` or `checkout.declined`.
pub struct AuthorizeStep {
    /// The payments database.
    pub leases: Leases,
    /// The primary provider and the fallback; see `providers` for when the fallback is used.
    pub providers: Arc<Providers>,
    /// Failed provider calls allowed per order (together with `retry_window`).
    pub max_attempts: i32,
    /// How long provider trouble is retried for one order (together with `max_attempts`).
    pub retry_window: Duration,
    /// Risk scores at or above this are refused (the authorization is voided).
    pub max_risk_score: u8,
    /// Opens the sealed payment token the edge put in the checkout.
    pub seal: Arc<super::token_seal::TokenSeal>,
    /// Fault injection: fail once after the provider answered, before committing.
    pub fail_after_provider_call: bool,
    /// The watchdog's `pending_limit`: only orders older than this are abandoned.
    pub pending_limit: Duration,
    /// `payments.action_timeout`: a challenged checkout's holds are extended past it.
    pub action_timeout: Duration,
}

/// What the look before an older or redelivered checkout's provider call found.
enum Looked {
    /// The watchdog abandoned the order before its payment started: do not start one.
    Abandoned,
    /// Go on to the provider; `failed_before`: an earlier call for this payment failed, so
    /// the breaker does not take another failure as news of the provider (it may have
    /// restarted and forgotten); `pinned`: the provider an earlier delivery chose.
    Go {
        failed_before: bool,
        pinned: Option<String>,
    },
}

/// What the provider's answer (or our policy on it) decided.
pub enum Authorization {
    /// Decided by the named provider (the one holding the authorization, if there is one).
    Decided(Decision, &'static str),
    /// The order was abandoned: no payment (a late authorization was voided already).
    Abandoned,
}

/// What to record and emit.
pub enum Decision {
    Approved(String, Option<DateTime<Utc>>),
    /// The provider holds it undecided: the buyer's challenge at `next_action`, or its own
    /// later answer. A webhook (or the challenge timeout) settles it.
    Pending {
        auth_id: String,
        next_action: Option<String>,
        expires_at: Option<DateTime<Utc>>,
    },
    Refused {
        status: PaymentStatus,
        auth_id: Option<String>,
        expires_at: Option<DateTime<Utc>>,
        code: String,
        reason: FailureReason,
    },
}

impl Step for AuthorizeStep {
    const DURABLE: &'static str = "authorize";
    const INBOX: InboxTable = InboxTable::Payments;
    const SHAPE: Shape = Shape::Prepared;
    type Input = Checkout;
    type Found = Authorization;

    fn consumes(&self) -> Vec<EventKind> {
        vec![EventKind::Reserved]
    }

    fn leases(&self) -> &Leases {
        &self.leases
    }

    fn input(&self, event: Event) -> Result<Checkout, String> {
        match event {
            Event::Reserved { checkout, .. } => Ok(checkout),
            other => Err(format!("authorize cannot handle {:?}", other.kind())),
        }
    }

    /// The provider call. It cannot sit inside a transaction, so an abandoned order is looked
    /// for first: a young first delivery needs no look (only the watchdog abandons payments,
    /// of orders older than `pending_limit`; half of it here, for clocks that disagree). A
    /// replay meets the inbox, then the payment row, after the provider, whose idempotency key
    /// answers a repeated call as it answered the first.
    async fn prepare(
        &self,
        checkout: &Checkout,
        delivery: &Delivery,
    ) -> Result<Authorization, StepError> {
        let young = delivery.delivered == 1 && self.young(checkout);
        let (mut failed_before, mut pinned) = (false, None);
        if !young {
            match self.look_first(checkout).await? {
                Looked::Abandoned => return Ok(Authorization::Abandoned),
                Looked::Go {
                    failed_before: f,
                    pinned: p,
                } => (failed_before, pinned) = (f, p),
            }
        }
        let route = self
            .route(checkout.order_id, delivery, failed_before, pinned)
            .await?;
        let decision = self.ask(checkout, route, failed_before).await?;
        if self.fail_after_provider_call && delivery.delivered == 1 {
            return Err(StepError::transient(
                "chaos: failing after the provider call",
            ));
        }
        // Abandoned while the provider was answering: give the hold back now. An order still
        // young cannot have been (the payment row would stop it at the commit anyway, and the
        // reconciler void its hold later).
        if let (Some(auth_id), false) = (decision.auth_id(), self.young(checkout)) {
            if self.abandoned(checkout.order_id).await? {
                self.void_late(checkout.order_id, auth_id).await?;
                return Ok(Authorization::Abandoned);
            }
        }
        let holder = decision
            .auth_id()
            .map_or(self.providers.name_of(route), |id| {
                self.providers.holder(id)
            });
        Ok(Authorization::Decided(decision, holder))
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        items: &[(&Checkout, &Authorization)],
    ) -> Result<Vec<Vec<Event>>, StepError> {
        // A challenged payment's outcome may have come first (parked): it decides instead.
        let settled = super::updates::take_parked(tx.conn, items, self.action_timeout).await?;
        let decided: Vec<(&Checkout, PaymentRecord)> = items
            .iter()
            .filter_map(|(checkout, found)| match found {
                Authorization::Decided(decision, provider) => {
                    let decision = settled.get(&checkout.order_id).unwrap_or(decision);
                    Some((*checkout, record_of(decision, provider)))
                }
                Authorization::Abandoned => None,
            })
            .collect();
        let recorded = record_payments(tx.conn, &decided).await?;
        let mut outputs = Vec::with_capacity(items.len());
        let mut flagged = 0;
        for (checkout, found) in items {
            let events = match found {
                Authorization::Decided(decision, _) if recorded.contains(&checkout.order_id) => {
                    let decision = settled.get(&checkout.order_id).unwrap_or(decision);
                    flagged += usize::from(decision.is_fraud());
                    outcome(checkout, decision)
                }
                // A payment row was there first: the order was abandoned meanwhile (the
                // reconciler voids what we hold), or another delivery recorded it (the inbox
                // finds that one, and this attempt rolls back).
                Authorization::Decided(decision, _) => {
                    give_back_later(tx.conn, checkout.order_id, decision).await?;
                    abandoned((*checkout).clone())
                }
                Authorization::Abandoned => abandoned((*checkout).clone()),
            };
            outputs.push(events);
        }
        tx.after_commit(move || {
            for _ in 0..flagged {
                crate::metrics::fraud_flag();
            }
        });
        Ok(outputs)
    }

    /// Another delivery recorded the payment first: give back a hold it does not hold.
    async fn superseded(
        &self,
        checkout: &Checkout,
        found: &Authorization,
    ) -> Result<(), StepError> {
        match found {
            Authorization::Decided(decision, _) => match decision.auth_id() {
                Some(auth_id) => self.give_back_unrecorded(checkout.order_id, auth_id).await,
                None => Ok(()),
            },
            Authorization::Abandoned => Ok(()),
        }
    }
}

impl AuthorizeStep {
    /// Voids `auth_id` unless it is the authorization the order's payment recorded. The
    /// provider answers a repeated call from its idempotency key, unless the first calls
    /// failed before it bound the key: then a replay after the order ended (with
    /// `payment_unavailable`) gets a new hold that nobody would capture or void. If the void
    /// cannot be made now, the reconciler is asked to look at the order's payment again.
    async fn give_back_unrecorded(&self, order_id: Uuid, auth_id: &str) -> Result<(), StepError> {
        let recorded: Option<Option<String>> =
            sqlx::query_scalar("SELECT auth_id FROM payments.payments WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(self.leases.pool())
                .await
                .map_err(StepError::transient)?;
        if recorded.flatten().as_deref() == Some(auth_id) {
            return Ok(());
        }
        let key = idempotency_key(order_id, &format!("void:{auth_id}"));
        match self.providers.void(auth_id, &key).await {
            Ok(()) => {
                tracing::warn!(%auth_id, "voided an authorization the order's payment does not hold");
            }
            Err(e) => {
                tracing::warn!(%auth_id, error = %e, "cannot void an authorization the order's payment does not hold; the reconciler will");
                sqlx::query(
                    "UPDATE payments.payments SET reconciled_at = NULL, updated_at = now()
                     WHERE order_id = $1 AND status IN ('failed', 'abandoned')",
                )
                .bind(order_id)
                .execute(self.leases.pool())
                .await
                .map_err(StepError::transient)?;
            }
        }
        Ok(())
    }

    /// Whether the watchdog abandoned the order, and whether an earlier provider call for its
    /// payment failed (one round trip).
    async fn look_first(&self, checkout: &Checkout) -> Result<Looked, StepError> {
        let mut lease = self.leases.acquire().await.map_err(StepError::transient)?;
        let (abandoned_already, failed_before, pinned): (bool, bool, Option<String>) =
            sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM payments.payments
                                WHERE order_id = $1 AND status = 'abandoned'),
                        EXISTS (SELECT 1 FROM payments.attempts
                                WHERE order_id = $1 AND failures > 0),
                        (SELECT provider FROM payments.attempts WHERE order_id = $1)",
            )
            .bind(checkout.order_id)
            .fetch_one(&mut *lease)
            .await
            .map_err(StepError::transient)?;
        lease.park();
        Ok(if abandoned_already {
            Looked::Abandoned
        } else {
            Looked::Go {
                failed_before,
                pinned,
            }
        })
    }

    /// Which provider asks for this order's authorization: the one an earlier delivery chose;
    /// else the fallback only if the primary's breaker is open and nothing at the primary can
    /// be in flight (the first delivery, no failure on record); the choice of the fallback is
    /// written down before the call, so a redelivery asks it again and no order is authorized
    /// twice. A pin that lost a race to a failure at the primary stays with the primary.
    async fn route(
        &self,
        order_id: Uuid,
        delivery: &Delivery,
        failed_before: bool,
        pinned: Option<String>,
    ) -> Result<Route, StepError> {
        if let Some(route) = pinned
            .as_deref()
            .and_then(|p| self.providers.route_named(p))
        {
            return Ok(route);
        }
        let may_fall_back = delivery.delivered == 1 && !failed_before;
        if self.providers.route(may_fall_back) == Route::Primary {
            return Ok(Route::Primary);
        }
        let fallback = self.providers.name_of(Route::Fallback);
        let pinned: Option<String> = sqlx::query_scalar(
            "INSERT INTO payments.attempts (order_id, failures, last_error, provider)
             VALUES ($1, 0, 'routed to the fallback: the primary breaker is open', $2)
             ON CONFLICT (order_id) DO UPDATE SET provider = CASE
                 WHEN payments.attempts.failures = 0
                 THEN coalesce(payments.attempts.provider, EXCLUDED.provider)
                 ELSE payments.attempts.provider END
             RETURNING provider",
        )
        .bind(order_id)
        .bind(fallback)
        .fetch_one(self.leases.pool())
        .await?;
        tracing::warn!(%order_id, provider = fallback, "the primary provider's breaker is open: authorizing at the fallback");
        crate::metrics::fallback_routing();
        Ok(pinned
            .as_deref()
            .and_then(|p| self.providers.route_named(p))
            .unwrap_or(Route::Primary))
    }

    /// Whether the order is too young for the watchdog to have abandoned it: it abandons
    /// orders older than `pending_limit` (half of it here, for clocks that disagree).
    fn young(&self, checkout: &Checkout) -> bool {
        (Utc::now() - checkout.requested_at)
            .to_std()
            .is_ok_and(|age| age < self.pending_limit / 2)
    }

    /// Whether the order's payment was abandoned (by the watchdog's compensation).
    async fn abandoned(&self, order_id: Uuid) -> Result<bool, StepError> {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM payments.payments WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(self.leases.pool())
                .await?;
        Ok(status.as_deref() == Some("abandoned"))
    }

    /// Voids an authorization that completed after its order was abandoned.
    async fn void_late(&self, order_id: Uuid, auth_id: &str) -> Result<(), StepError> {
        match self
            .providers
            .void(auth_id, &idempotency_key(order_id, "void"))
            .await
        {
            Ok(()) => {
                tracing::warn!(%auth_id, "voided an authorization that completed after the order was abandoned");
                Ok(())
            }
            Err(ProviderError::Deferred(wait)) => Err(StepError::RetryAfter(wait)),
            Err(ProviderError::Unavailable(e)) => {
                Err(StepError::transient(format!("void after abandonment: {e}")))
            }
            // The reconciler looks at abandoned payments again later.
            Err(ProviderError::Rejected(e)) => {
                tracing::error!(%auth_id, error = %e, "the provider refused to void a late authorization");
                Ok(())
            }
        }
    }

    /// Opens the payment token and asks the provider; a token nobody can open any more (its
    /// key was dropped, or it is damaged) fails the order like a declined card instead of
    /// retrying forever.
    async fn ask(
        &self,
        checkout: &Checkout,
        route: Route,
        failed_before: bool,
    ) -> Result<Decision, StepError> {
        let order_id = checkout.order_id;
        match self.seal.open(&checkout.payment_token) {
            Ok(token) => {
                let request = AuthorizeRequest {
                    order_id,
                    amount: checkout.total,
                    currency: checkout.currency.code().to_owned(),
                    token,
                    // Same key on every retry: the provider returns the first authorization
                    // again, so a crash between its answer and our commit never authorizes twice.
                    idempotency_key: idempotency_key(order_id, "authorize"),
                    return_url: checkout.return_url.clone(),
                    failed_before,
                };
                self.decide(route, &request).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "payment token cannot be opened");
                Ok(Decision::Refused {
                    status: PaymentStatus::Declined,
                    auth_id: None,
                    expires_at: None,
                    code: "token_unreadable".into(),
                    reason: FailureReason::PaymentDeclined,
                })
            }
        }
    }

    /// Asks the provider and turns its answer into a decision, or into a retry.
    async fn decide(
        &self,
        route: Route,
        request: &AuthorizeRequest,
    ) -> Result<Decision, StepError> {
        match self.providers.authorize_at(route, request).await {
            Ok(AuthorizeOutcome::Approved {
                auth_id,
                expires_at,
                risk_score,
            }) => match risk_score {
                Some(score) if score >= self.max_risk_score => {
                    tracing::warn!(
                        risk_score = score,
                        "fraud suspected; the authorization will be voided"
                    );
                    Ok(Decision::Refused {
                        status: PaymentStatus::Authorized,
                        auth_id: Some(auth_id),
                        expires_at,
                        code: "fraud_suspected".into(),
                        reason: FailureReason::FraudSuspected,
                    })
                }
                _ => Ok(Decision::Approved(auth_id, expires_at)),
            },
            Ok(AuthorizeOutcome::Pending {
                auth_id,
                next_action,
                expires_at,
            }) => Ok(Decision::Pending {
                auth_id,
                next_action,
                expires_at,
            }),
            Ok(AuthorizeOutcome::Declined { code }) => Ok(Decision::Refused {
                status: PaymentStatus::Declined,
                auth_id: None,
                expires_at: None,
                code,
                reason: FailureReason::PaymentDeclined,
            }),
            Err(ProviderError::Deferred(wait)) => Err(StepError::RetryAfter(wait)),
            Err(ProviderError::Unavailable(e)) => {
                let spent = record_failure(
                    self.leases.pool(),
                    request.order_id,
                    &e,
                    self.max_attempts,
                    self.retry_window,
                )
                .await?;
                if !spent {
                    return Err(StepError::transient(format!("provider unavailable: {e}")));
                }
                tracing::warn!(error = %e, "giving up on the provider for this order");
                self.settle_unknown(request.order_id, "payment_unavailable".into())
                    .await
            }
            Err(ProviderError::Rejected(e)) => {
                tracing::warn!(error = %e, "the provider refused the authorization request");
                let code = format!(
                    "provider_rejected: {}",
                    e.chars().take(200).collect::<String>()
                );
                self.settle_unknown(request.order_id, code).await
            }
        }
    }

    /// The outcome is unknown: the provider's records decide. An authorization it holds for
    /// the order is adopted; otherwise the order fails with `payment_unavailable`, recorded
    /// as `failed` so that the reconciler looks again later for one that completes late.
    async fn settle_unknown(&self, order_id: Uuid, code: String) -> Result<Decision, StepError> {
        let found = match self.providers.authorizations_for(order_id).await {
            Ok(found) => found,
            Err(ProviderError::Deferred(wait)) => return Err(StepError::RetryAfter(wait)),
            Err(e) => {
                return Err(StepError::transient(format!(
                    "cannot read the provider's records: {e}"
                )))
            }
        };
        if let Some(held) = found.into_iter().find(|a| a.status == "authorized") {
            tracing::warn!(auth_id = %held.auth_id, "adopting the authorization the provider holds");
            return Ok(Decision::Approved(held.auth_id, held.expires_at));
        }
        Ok(Decision::Refused {
            status: PaymentStatus::Failed,
            auth_id: None,
            expires_at: None,
            code,
            reason: FailureReason::PaymentUnavailable,
        })
    }
}

fn abandoned(checkout: Checkout) -> Vec<Event> {
    vec![Event::Declined {
        checkout: checkout.spent(),
        decline_code: "abandoned".into(),
        reason: FailureReason::TimedOut,
    }]
}

impl Decision {
    /// The authorization the provider holds for this decision, if any.
    fn auth_id(&self) -> Option<&str> {
        match self {
            Self::Approved(auth_id, _) | Self::Pending { auth_id, .. } => Some(auth_id),
            Self::Refused { auth_id, .. } => auth_id.as_deref(),
        }
    }

    /// Whether our risk policy refused it.
    fn is_fraud(&self) -> bool {
        matches!(self, Self::Refused { reason, .. } if *reason == FailureReason::FraudSuspected)
    }
}

/// What the payments row records of the provider's answer.
struct PaymentRecord {
    provider: &'static str,
    status: PaymentStatus,
    auth_id: Option<String>,
    decline_code: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    next_action: Option<String>,
}

fn record_of(decision: &Decision, provider: &'static str) -> PaymentRecord {
    match decision {
        Decision::Approved(auth_id, expires_at) => PaymentRecord {
            provider,
            status: PaymentStatus::Authorized,
            auth_id: Some(auth_id.clone()),
            decline_code: None,
            expires_at: *expires_at,
            next_action: None,
        },
        Decision::Pending {
            auth_id,
            next_action,
            expires_at,
        } => PaymentRecord {
            provider,
            status: PaymentStatus::Pending,
            auth_id: Some(auth_id.clone()),
            decline_code: None,
            expires_at: *expires_at,
            next_action: next_action.clone(),
        },
        Decision::Refused {
            status,
            auth_id,
            expires_at,
            code,
            ..
        } => PaymentRecord {
            provider,
            status: *status,
            auth_id: auth_id.clone(),
            decline_code: Some(code.clone()),
            expires_at: *expires_at,
            next_action: None,
        },
    }
}

/// The events a decision emits.
fn outcome(checkout: &Checkout, decision: &Decision) -> Vec<Event> {
    match decision {
        Decision::Approved(auth_id, _) => vec![Event::Authorized {
            checkout: checkout.clone().spent(),
            payment_id: payment_id_for(checkout.order_id),
            auth_id: auth_id.clone(),
        }],
        Decision::Pending {
            auth_id,
            next_action,
            ..
        } => {
            tracing::info!(%auth_id, challenge = next_action.is_some(), "payment awaits the buyer or the provider");
            vec![Event::ActionRequired {
                checkout: checkout.clone().spent(),
                auth_id: auth_id.clone(),
                next_action: next_action.clone(),
            }]
        }
        Decision::Refused { code, reason, .. } => {
            tracing::info!(decline_code = %code, reason = reason.as_str(), "payment refused");
            vec![Event::Declined {
                checkout: checkout.clone().spent(),
                decline_code: code.clone(),
                reason: *reason,
            }]
        }
    }
}

/// Records the payments of `decided` (one statement); the orders recorded now. An order that
/// has a payment row already (abandoned, or recorded by another delivery) is not.
async fn record_payments(
    conn: &mut PgConnection,
    decided: &[(&Checkout, PaymentRecord)],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    if decided.is_empty() {
        return Ok(HashSet::new());
    }
    let recorded: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO payments.payments
             (payment_id, order_id, provider, status, auth_id, amount, currency, decline_code,
              expires_at, next_action_url)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                              $6::numeric[], $7::text[], $8::text[], $9::timestamptz[], $10::text[])
         ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
    )
    .bind(
        decided
            .iter()
            .map(|(c, _)| payment_id_for(c.order_id))
            .collect::<Vec<_>>(),
    )
    .bind(decided.iter().map(|(c, _)| c.order_id).collect::<Vec<_>>())
    .bind(decided.iter().map(|(_, r)| r.provider).collect::<Vec<_>>())
    .bind(
        decided
            .iter()
            .map(|(_, r)| r.status.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        decided
            .iter()
            .map(|(_, r)| r.auth_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(decided.iter().map(|(c, _)| c.total).collect::<Vec<_>>())
    .bind(
        decided
            .iter()
            .map(|(c, _)| c.currency.code())
            .collect::<Vec<_>>(),
    )
    .bind(
        decided
            .iter()
            .map(|(_, r)| r.decline_code.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        decided
            .iter()
            .map(|(_, r)| r.expires_at)
            .collect::<Vec<_>>(),
    )
    .bind(
        decided
            .iter()
            .map(|(_, r)| r.next_action.as_deref())
            .collect::<Vec<_>>(),
    )
    .fetch_all(conn)
    .await?;
    Ok(recorded.into_iter().collect())
}

/// An authorization that completed while its order was being abandoned, caught by the payment
/// row and not before: the reconciler voids whatever the provider holds for the order.
async fn give_back_later(
    conn: &mut PgConnection,
    order_id: Uuid,
    decision: &Decision,
) -> Result<(), sqlx::Error> {
    if decision.auth_id().is_some() {
        sqlx::query(
            "UPDATE payments.payments SET reconciled_at = NULL, updated_at = now()
             WHERE order_id = $1 AND status = 'abandoned'",
        )
        .bind(order_id)
        .execute(conn)
        .await?;
    }
    Ok(())
}

/// Counts a failed provider call; true once the order's retry budget is spent (at least
/// `max_attempts` failures and at least `window` since the first).
async fn record_failure(
    pool: &PgPool,
    order_id: Uuid,
    error: &str,
    max_attempts: i32,
    window: Duration,
) -> Result<bool, sqlx::Error> {
    let (spent,): (bool,) = sqlx::query_as(
        "INSERT INTO payments.attempts (order_id, failures, last_error) VALUES ($1, 1, $2)
         ON CONFLICT (order_id) DO UPDATE SET failures = payments.attempts.failures + 1,
             last_error = EXCLUDED.last_error, updated_at = now()
         RETURNING failures >= $3 AND now() - first_failed_at >= $4::interval",
    )
    .bind(order_id)
    .bind(error.chars().take(500).collect::<String>())
    .bind(max_attempts)
    .bind(format!("{} milliseconds", window.as_millis()))
    .fetch_one(pool)
    .await?;
    Ok(spent)
}
