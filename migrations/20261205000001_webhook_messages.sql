-- A message's body is stored once, not once per endpoint: with three endpoints every event
-- wrote its body three times, and every claim and outcome rewrote a delivery row with it.
-- Deliveries are now narrow rows (what was sent where, and how it went).
CREATE TABLE webhooks.messages (
    webhook_id  text PRIMARY KEY,
    event_type  text NOT NULL,
    order_id    uuid NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO webhooks.messages (webhook_id, event_type, order_id, body, created_at)
SELECT DISTINCT ON (webhook_id) webhook_id, event_type, order_id, body, created_at
FROM webhooks.deliveries
ORDER BY webhook_id, created_at;

-- No foreign key to messages: the feed writes a message and its deliveries in one statement,
-- and the check would cost an index probe per delivery on the hot path.
ALTER TABLE webhooks.deliveries
    DROP COLUMN body,
    DROP COLUMN event_type,
    DROP COLUMN order_id;

-- From now on an attempt row is written for a failed attempt only; a success is the delivery
-- row itself (attempts, last_status, last_latency_ms, delivered_at), kept as an attempt row
-- when a replay sends the message again.

-- The pruner (retention.webhooks) finds old rows by time: BRIN, nearly free on the hot path.
CREATE INDEX deliveries_created_brin ON webhooks.deliveries USING brin (created_at);
CREATE INDEX messages_created_brin ON webhooks.messages USING brin (created_at);
