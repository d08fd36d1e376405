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

-- A claim's lease is a column of its own that no index covers, so a claim is a HOT update (no
-- index entries), with room kept on each page for it. Before, the lease was next_attempt_at,
-- which the due index covers: every claim wrote three index entries.
ALTER TABLE webhooks.deliveries ADD COLUMN leased_until timestamptz;
ALTER TABLE webhooks.deliveries SET (fillfactor = 70);
-- (A delivery leased the old way when this runs waits until its next_attempt_at: the same.)

-- Time is indexed once per message, not once per endpoint (and again on every rewrite of a
-- delivery): the delivery log walks messages newest first, replay takes messages since.
DROP INDEX webhooks.deliveries_by_time;
CREATE INDEX messages_by_time ON webhooks.messages (created_at);
-- The pruner (retention.webhooks) finds old deliveries by time: BRIN, nearly free.
CREATE INDEX deliveries_created_brin ON webhooks.deliveries USING brin (created_at);
