-- Money after the order: an order ships in parts (each a capture of its share), is refunded
-- in parts, and its unshipped rest can be cancelled (restock, void the uncaptured remainder).

ALTER TABLE orders.orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders.orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('confirmed', 'failed', 'partially_shipped', 'shipped', 'partially_refunded',
                      'refunded', 'cancelled'));
-- What is not shipped yet will not ship: a cancel after a first shipment.
ALTER TABLE orders.orders ADD COLUMN rest_cancelled boolean NOT NULL DEFAULT false;

-- One row per shipment asked for. amount: its share of the order's total (see
-- lib/orders/allocation.rs), fixed when it is asked for; the capture takes exactly that.
-- attempt: the order's action attempt that carries it (its saga messages' ids).
-- status: capturing -> shipped, or failed (failure says why; its units can ship again).
CREATE TABLE orders.shipments (
    shipment_id      uuid PRIMARY KEY,
    order_id         uuid NOT NULL REFERENCES orders.orders (order_id),
    idempotency_key  text NOT NULL,
    lines            jsonb NOT NULL,
    amount           numeric(20, 4) NOT NULL CHECK (amount >= 0),
    attempt          integer NOT NULL,
    status           text NOT NULL CHECK (status IN ('capturing', 'shipped', 'failed')),
    failure          text,
    provider_ref     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, idempotency_key)
);
CREATE INDEX shipments_by_order ON orders.shipments (order_id, created_at);

-- One row per refund asked for: by lines (their share, as shipments) or by amount.
-- restock: whether the refunded lines' units go back on hand.
CREATE TABLE orders.refunds (
    refund_id        uuid PRIMARY KEY,
    order_id         uuid NOT NULL REFERENCES orders.orders (order_id),
    idempotency_key  text NOT NULL,
    lines            jsonb,
    amount           numeric(20, 4) NOT NULL CHECK (amount > 0),
    reason           text NOT NULL,
    restock          boolean NOT NULL DEFAULT false,
    attempt          integer NOT NULL,
    status           text NOT NULL CHECK (status IN ('refunding', 'refunded', 'failed')),
    failure          text,
    provider_ref     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (order_id, idempotency_key)
);
CREATE INDEX refunds_by_order ON orders.refunds (order_id, created_at);

-- The payments ledger: every movement of money the provider confirmed, once each (the key
-- names the shipment, refund or void it belongs to). The audit adds these up per order and
-- compares them with the provider's own figures.
CREATE TABLE payments.movements (
    order_id      uuid NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('capture', 'refund', 'void')),
    key           text NOT NULL,
    amount        numeric(20, 4) NOT NULL CHECK (amount >= 0),
    provider      text NOT NULL,
    provider_ref  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, kind, key)
);

-- Units an order gave back to stock after it shipped in part (the unshipped rest of a
-- cancelled order, a refund's returned lines), once per (order, key, sku).
CREATE TABLE inventory.returns (
    order_id    uuid NOT NULL,
    key         text NOT NULL,
    sku         text NOT NULL,
    qty         integer NOT NULL CHECK (qty > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, key, sku)
);
ALTER TABLE inventory.stock_movements DROP CONSTRAINT stock_movements_kind_check;
ALTER TABLE inventory.stock_movements ADD CONSTRAINT stock_movements_kind_check
    CHECK (kind IN ('reserve', 'release', 'expire', 'commit', 'adjust', 'return'));

-- Orders shipped or refunded whole before this migration: one shipment of every line for the
-- total, one refund of it, and their movements, so the money summary tells their story too.
INSERT INTO orders.shipments (shipment_id, order_id, idempotency_key, lines, amount, attempt,
                              status, created_at, updated_at)
SELECT md5(o.order_id::text || ':shipment:whole')::uuid, o.order_id, 'whole',
       (SELECT jsonb_agg(jsonb_build_object('sku', i.sku, 'qty', i.qty) ORDER BY i.sku)
        FROM orders.order_items i WHERE i.order_id = o.order_id),
       o.total, o.action_attempt, 'shipped', o.updated_at, o.updated_at
FROM orders.orders o WHERE o.status IN ('shipped', 'refunded');
INSERT INTO orders.refunds (refund_id, order_id, idempotency_key, amount, reason, attempt,
                            status, created_at, updated_at)
SELECT md5(o.order_id::text || ':refund:whole')::uuid, o.order_id, 'whole', o.total,
       'requested_by_customer', o.action_attempt, 'refunded', o.updated_at, o.updated_at
FROM orders.orders o WHERE o.status = 'refunded' AND o.total > 0;
INSERT INTO payments.movements (order_id, kind, key, amount, provider, created_at)
SELECT p.order_id, 'capture', 'whole', p.amount, p.provider, p.updated_at
FROM payments.payments p WHERE p.status IN ('captured', 'refunded');
INSERT INTO payments.movements (order_id, kind, key, amount, provider, created_at)
SELECT p.order_id, 'refund', 'whole', p.amount, p.provider, p.updated_at
FROM payments.payments p WHERE p.status = 'refunded';
INSERT INTO payments.movements (order_id, kind, key, amount, provider, created_at)
SELECT p.order_id, 'void', 'whole', p.amount, p.provider, p.updated_at
FROM payments.payments p WHERE p.status = 'voided';
