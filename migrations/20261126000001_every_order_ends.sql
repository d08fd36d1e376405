-- Every accepted order ends: one outbox for everything the edge publishes, attempt numbers for
-- repeatable actions, tombstones and reconciliation for payments, and the watchdog's state.

-- The edge's outbox: every event the edge owes JetStream (checkout requests, ship, cancel and
-- refund requests), written in the same transaction as the change that owes it. A row whose
-- publish fails is retried with a doubling delay and skipped meanwhile.
CREATE TABLE edge.outbox (
    msg_id           text PRIMARY KEY,
    subject          text NOT NULL,
    payload          bytea NOT NULL,
    traceparent      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text
);
CREATE INDEX outbox_due ON edge.outbox (next_attempt_at) WHERE published_at IS NULL;

-- Requests accepted before this migration and not yet published move to the outbox.
INSERT INTO edge.outbox (msg_id, subject, payload, traceparent, created_at)
SELECT order_id::text || '.requested', 'checkout.requested.' || order_id::text, event, traceparent,
       created_at
FROM edge.checkouts WHERE published_at IS NULL;
DROP INDEX edge.checkouts_unpublished;
ALTER TABLE edge.checkouts DROP COLUMN published_at;
-- The watchdog walks accepted checkouts by age.
CREATE INDEX checkouts_by_age ON edge.checkouts (created_at);

-- Ship, cancel and refund can be asked again after the provider refused one: each request is
-- a numbered attempt with its own message ids and inbox keys.
ALTER TABLE orders.orders ADD COLUMN action_attempt integer NOT NULL DEFAULT 0;

-- 'abandoned': the order was failed (timed out) before any authorization was recorded; an
-- authorization that completes later is voided at once. reconciled_at: when the provider's own
-- records were last checked for an authorization whose outcome we did not know.
ALTER TABLE payments.payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments.payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('authorized', 'captured', 'voided', 'refunded', 'declined', 'failed', 'abandoned'));
ALTER TABLE payments.payments ADD COLUMN reconciled_at timestamptz;
CREATE INDEX payments_to_reconcile ON payments.payments (updated_at)
    WHERE status IN ('failed', 'abandoned') AND reconciled_at IS NULL;

-- Retries against the provider are bounded by time as well as by count.
ALTER TABLE payments.attempts ADD COLUMN first_failed_at timestamptz NOT NULL DEFAULT now();

-- The watchdog: every checkout accepted before settled_before has an order (or is in
-- timeouts), so each pass only looks at newer ones.
CREATE TABLE orders.watchdog (
    id              boolean PRIMARY KEY DEFAULT true CHECK (id),
    settled_before  timestamptz NOT NULL
);
INSERT INTO orders.watchdog (settled_before) VALUES ('1970-01-01T00:00:00Z');

-- Orders the watchdog timed out, and when it last asked for their compensation.
CREATE TABLE orders.timeouts (
    order_id     uuid PRIMARY KEY,
    first_at     timestamptz NOT NULL DEFAULT now(),
    last_at      timestamptz NOT NULL DEFAULT now(),
    requests     integer NOT NULL DEFAULT 1
);
