-- The edge's hot path in fewer round trips (issue 12).

-- One open cart per user, held by the database instead of an advisory lock: two first
-- requests of one buyer race on this index, and `ON CONFLICT DO NOTHING` makes the loser
-- find the winner's cart.
CREATE UNIQUE INDEX carts_one_open_per_user ON edge.carts (user_id) WHERE status = 'open';

-- Each line remembers the currency it was added in, so "one currency per cart" is a
-- condition on the line's insert rather than a look-up before it. Pricing still checks the
-- catalog's current prices; this only refuses a mixed cart early.
ALTER TABLE edge.cart_items ADD COLUMN currency text;
UPDATE edge.cart_items i SET currency = p.currency
FROM catalog.products p WHERE p.sku = i.sku;

-- The orders service's answer to "did this order fail?", callable inside the edge's cart
-- statement (the edge reads orders through this function, never its table).
CREATE FUNCTION orders.has_failed(p_order_id uuid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM orders.orders WHERE order_id = p_order_id AND status = 'failed')
$$;
