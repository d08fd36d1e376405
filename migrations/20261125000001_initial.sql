-- Each service owns one schema; only that service's code writes it.

-- The catalog (edge): what can be sold and at what price.
CREATE SCHEMA IF NOT EXISTS catalog;
CREATE TABLE catalog.products (
    sku           text PRIMARY KEY,
    name          text NOT NULL,
    price         numeric(20, 4) NOT NULL CHECK (price >= 0),
    currency      char(3) NOT NULL,
    weight_grams  integer NOT NULL CHECK (weight_grams >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Carts and accepted checkout requests (edge).
CREATE SCHEMA IF NOT EXISTS edge;
CREATE TABLE edge.carts (
    cart_id     uuid PRIMARY KEY,
    user_id     text NOT NULL,
    -- 'checked_out' locks the cart to order_id; a failed order unlocks it again.
    status      text NOT NULL CHECK (status IN ('open', 'checked_out')),
    order_id    uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX carts_by_user ON edge.carts (user_id, created_at DESC);

CREATE TABLE edge.cart_items (
    cart_id   uuid NOT NULL REFERENCES edge.carts (cart_id) ON DELETE CASCADE,
    sku       text NOT NULL,
    qty       integer NOT NULL CHECK (qty BETWEEN 1 AND 1000),
    added_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cart_id, sku)
);

-- One row per (user, Idempotency-Key): the stored result of a checkout and the outbox of
-- its checkout.requested event (published_at is set once JetStream acked it).
CREATE TABLE edge.checkouts (
    user_id          text NOT NULL,
    idempotency_key  text NOT NULL,
    request_hash     bytea NOT NULL,
    order_id         uuid NOT NULL UNIQUE,
    cart_id          uuid NOT NULL,
    event            bytea NOT NULL,
    traceparent      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX checkouts_unpublished ON edge.checkouts (created_at) WHERE published_at IS NULL;

-- Inventory: stock, reservations and the movement ledger.
CREATE SCHEMA IF NOT EXISTS inventory;
CREATE TABLE inventory.stock (
    sku         text PRIMARY KEY,
    on_hand     integer NOT NULL CHECK (on_hand >= 0),
    reserved    integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (reserved <= on_hand)
);

CREATE TABLE inventory.inventory_reservations (
    reservation_id  uuid PRIMARY KEY,
    order_id        uuid NOT NULL,
    sku             text NOT NULL,
    qty             integer NOT NULL CHECK (qty > 0),
    status          text NOT NULL CHECK (status IN ('held', 'committed', 'released', 'expired')),
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, sku)
);
CREATE INDEX reservations_expiring ON inventory.inventory_reservations (expires_at)
    WHERE status = 'held';

-- Every change to stock, so that on_hand and reserved can be audited from their history.
CREATE TABLE inventory.stock_movements (
    movement_id     bigserial PRIMARY KEY,
    sku             text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('reserve', 'release', 'expire', 'commit', 'adjust')),
    order_id        uuid,
    on_hand_delta   integer NOT NULL,
    reserved_delta  integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_movements_by_sku ON inventory.stock_movements (sku, movement_id);

CREATE TABLE inventory.inbox (
    consumer    text NOT NULL,
    event_id    text NOT NULL,
    outputs     bytea,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Payments: one authorization per order.
CREATE SCHEMA IF NOT EXISTS payments;
CREATE TABLE payments.payments (
    payment_id      uuid PRIMARY KEY,
    order_id        uuid NOT NULL UNIQUE,
    provider        text NOT NULL,
    status          text NOT NULL CHECK (status IN ('authorized', 'captured', 'voided', 'refunded', 'declined', 'failed')),
    auth_id         text,
    amount          numeric(20, 4) NOT NULL,
    currency        char(3) NOT NULL,
    decline_code    text,
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payments.inbox (
    consumer    text NOT NULL,
    event_id    text NOT NULL,
    outputs     bytea,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Orders: created when the saga settles (confirmed or failed); pending lives in the edge.
CREATE SCHEMA IF NOT EXISTS orders;
CREATE TABLE orders.orders (
    order_id    uuid PRIMARY KEY,
    user_id     text NOT NULL,
    status      text NOT NULL CHECK (status IN ('confirmed', 'failed')),
    reason      text,
    subtotal    numeric(20, 4) NOT NULL,
    discount    numeric(20, 4) NOT NULL,
    tax         numeric(20, 4) NOT NULL,
    shipping    numeric(20, 4) NOT NULL,
    total       numeric(20, 4) NOT NULL,
    currency    char(3) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_user ON orders.orders (user_id, created_at DESC);

CREATE TABLE orders.order_items (
    order_id  uuid NOT NULL REFERENCES orders.orders (order_id),
    sku       text NOT NULL,
    qty       integer NOT NULL CHECK (qty > 0),
    price     numeric(20, 4) NOT NULL,
    PRIMARY KEY (order_id, sku)
);

CREATE TABLE orders.inbox (
    consumer    text NOT NULL,
    event_id    text NOT NULL,
    outputs     bytea,
    handled_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
