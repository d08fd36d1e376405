-- A message an endpoint took at its first attempt no longer leaves a delivery row of its own:
-- a healthy endpoint's batch (up to 64 messages) is one row here, its outcomes as arrays, so
-- what a busy endpoint costs PostgreSQL is a row per batch instead of a row (and a key) per
-- message. Delivery rows stay for what is not yet delivered (a failure, a retry, a replay)
-- and for a batch that was not all delivered at once.
--
-- last_tx, last_id: where the batch left the endpoint's cursor (its last message). A message
-- behind the cursor was sent in the first batch at or after its place in the log, if it is in
-- that batch's ids; the delivery log looks it up by this key.
CREATE TABLE webhooks.sent (
    endpoint_id uuid NOT NULL,
    last_tx     xid8 NOT NULL,
    last_id     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    ids         text[] NOT NULL,
    codes       int[] NOT NULL,
    latencies   int[] NOT NULL,
    PRIMARY KEY (endpoint_id, last_tx, last_id)
);
-- Replay and the pruner find batches by time.
CREATE INDEX sent_at_brin ON webhooks.sent USING brin (at);
