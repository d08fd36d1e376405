-- Asynchronous authorization (3-D Secure challenges, providers that answer by webhook).
--
-- 'pending': the provider holds an authorization that needs the buyer (next_action_url, a
-- challenge page) or its own later answer; a provider webhook or the challenge sweeper
-- (payments.action_timeout) settles it. action_started_at: when it began, for the sweeper.
ALTER TABLE payments.payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments.payments ADD CONSTRAINT payments_status_check
    CHECK (status IN ('pending', 'authorized', 'captured', 'voided', 'refunded', 'declined',
                      'failed', 'abandoned'));
ALTER TABLE payments.payments ADD COLUMN next_action_url text;
CREATE INDEX payments_pending ON payments.payments (created_at) WHERE status = 'pending';

-- Every provider webhook we acknowledged, stored in the transaction that acknowledged it and
-- deduplicated by the provider's own event id. applied: what the payment-updates step made of
-- it ('applied', 'ignored' for an update that would move the payment backwards, 'voided' for
-- a late approval given back), NULL while it waits for its payment to be recorded (parked).
CREATE TABLE payments.provider_events (
    provider     text NOT NULL,
    event_id     text NOT NULL,
    order_id     uuid NOT NULL,
    event_type   text NOT NULL,
    auth_id      text NOT NULL,
    amount       numeric(20, 4) NOT NULL,
    currency     char(3) NOT NULL,
    decline_code text,
    received_at  timestamptz NOT NULL DEFAULT now(),
    applied      text,
    applied_at   timestamptz,
    PRIMARY KEY (provider, event_id)
);
CREATE INDEX provider_events_parked ON payments.provider_events (order_id) WHERE applied IS NULL;

-- The provider an order's authorization was routed to when it was not the primary (the
-- fallback, while the primary's breaker was open), written before the call so that a
-- redelivery asks the same provider again.
ALTER TABLE payments.attempts ADD COLUMN provider text;
