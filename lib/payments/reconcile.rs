//! Reconciliation of payments whose outcome we did not know: we gave up on the provider
//! (`failed`), or the order was abandoned (`abandoned`) while a call may have been in flight.
//! A call that was still running at the provider when we looked can complete afterwards, so
//! after `payments.reconcile_delay` (longer than any call can take) the provider's own records
//! are read again and whatever it still holds for the order is voided. Each payment is
//! reconciled once, by whichever compensate process locks it first.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::provider::PaymentProvider;
use super::void::{void_what_the_provider_holds, VoidError, VoidOutcome};

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub checked: usize,
    /// Authorizations found live at the provider and voided.
    pub voided: usize,
    /// Voids the provider refused (left for a person; the audit reports them).
    pub refused: usize,
}

/// Reconciles up to `batch` payments that have been unknown for longer than `delay`.
pub async fn reconcile_due(
    pool: &PgPool,
    provider: &dyn PaymentProvider,
    delay: Duration,
    batch: i64,
) -> Result<Reconciled, VoidError> {
    let mut tx = pool.begin().await?;
    let due: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT order_id FROM payments.payments
         WHERE status IN ('failed', 'abandoned') AND reconciled_at IS NULL
           AND updated_at < now() - $1::interval
         ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(format!("{} milliseconds", delay.as_millis()))
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Reconciled::default();
    let mut checked = Vec::with_capacity(due.len());
    for (order_id,) in due {
        match void_what_the_provider_holds(provider, order_id).await? {
            VoidOutcome::Voided => done.voided += 1,
            VoidOutcome::Refused(detail) => {
                tracing::error!(%order_id, %detail, "the provider refused to void an orphaned authorization");
                done.refused += 1;
            }
            VoidOutcome::Nothing => {}
        }
        checked.push(order_id);
    }
    sqlx::query("UPDATE payments.payments SET reconciled_at = now() WHERE order_id = ANY($1)")
        .bind(&checked)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    done.checked = checked.len();
    Ok(done)
}

/// Reconciles every `every` until shutdown.
pub async fn run(
    pool: PgPool,
    provider: std::sync::Arc<dyn PaymentProvider>,
    delay: Duration,
    every: Duration,
    batch: i64,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match reconcile_due(&pool, provider.as_ref(), delay, batch).await {
            Ok(done) if done.voided + done.refused > 0 => {
                tracing::warn!(
                    checked = done.checked,
                    voided = done.voided,
                    refused = done.refused,
                    "payment reconciliation found authorizations nobody owned"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "payment reconciliation failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
