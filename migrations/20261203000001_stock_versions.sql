-- Every change of a stock row bumps its version (a trigger, so no writer can forget it, a
-- correction typed in psql included). Sold-out notices carry it, and an edge keeps the newest
-- it heard per SKU: a shortage seen before a restock cannot re-mark the SKU after it.
ALTER TABLE inventory.stock ADD COLUMN version bigint NOT NULL DEFAULT 0;

CREATE FUNCTION inventory.next_stock_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;

CREATE TRIGGER stock_version BEFORE UPDATE ON inventory.stock
    FOR EACH ROW EXECUTE FUNCTION inventory.next_stock_version();
