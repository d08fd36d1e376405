-- Merchant webhooks (Standard Webhooks): the shop's endpoints and every delivery to them.
CREATE SCHEMA IF NOT EXISTS webhooks;

-- secret: sealed like payment tokens (payments.token_keys); previous_secret signs beside it
-- until previous_until (a rotation's overlap). failing_since: the first failed attempt since
-- the last success; an endpoint failing for the whole retry period is disabled.
CREATE TABLE webhooks.endpoints (
    endpoint_id      uuid PRIMARY KEY,
    url              text NOT NULL,
    description      text NOT NULL DEFAULT '',
    events           text[] NOT NULL,
    secret           text NOT NULL,
    previous_secret  text,
    previous_until   timestamptz,
    status           text NOT NULL DEFAULT 'enabled' CHECK (status IN ('enabled', 'disabled')),
    disabled_reason  text,
    failing_since    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz
);

-- One row per (endpoint, message): webhook_id is the message's id on every attempt (receivers
-- deduplicate by it). body: the exact JSON signed and sent. queued_at: when its retry period
-- began (its creation, or a replay). next_attempt_at doubles as a lease: a claimed delivery is
-- pushed past the request's timeout, so a process killed mid-request leaves it to another.
CREATE TABLE webhooks.deliveries (
    endpoint_id      uuid NOT NULL REFERENCES webhooks.endpoints (endpoint_id),
    webhook_id       text NOT NULL,
    event_type       text NOT NULL,
    order_id         uuid NOT NULL,
    body             text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status      integer,
    last_error       text,
    last_latency_ms  integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    PRIMARY KEY (endpoint_id, webhook_id)
);
CREATE INDEX deliveries_due ON webhooks.deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX deliveries_by_time ON webhooks.deliveries (endpoint_id, created_at);

-- Every attempt, for the delivery log.
CREATE TABLE webhooks.attempts (
    endpoint_id  uuid NOT NULL,
    webhook_id   text NOT NULL,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,
    error        text,
    latency_ms   integer NOT NULL,
    PRIMARY KEY (endpoint_id, webhook_id, attempt)
);
