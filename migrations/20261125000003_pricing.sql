-- Pricing: tax codes on products, promotions, tax rates and shipping zones.
ALTER TABLE catalog.products ADD COLUMN tax_code text NOT NULL DEFAULT 'standard'
    CHECK (tax_code IN ('standard', 'reduced', 'exempt'));
ALTER TABLE catalog.products ADD COLUMN active boolean NOT NULL DEFAULT true;

CREATE SCHEMA IF NOT EXISTS pricing;

-- Codes are stored lower-case: lookups are case-insensitive.
CREATE TABLE pricing.promos (
    code                text PRIMARY KEY CHECK (code = lower(code)),
    kind                text NOT NULL CHECK (kind IN ('percent', 'fixed', 'free_shipping')),
    value               numeric(20, 4),
    min_subtotal        numeric(20, 4),
    starts_at           timestamptz,
    ends_at             timestamptz,
    usage_limit         integer CHECK (usage_limit >= 0),
    per_customer_limit  integer CHECK (per_customer_limit >= 0),
    skus                text[],
    -- Confirmed orders holding a redemption; never above usage_limit.
    used                integer NOT NULL DEFAULT 0 CHECK (used >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (usage_limit IS NULL OR used <= usage_limit)
);

CREATE TABLE pricing.promo_redemptions (
    order_id    uuid PRIMARY KEY,
    code        text NOT NULL REFERENCES pricing.promos (code),
    user_id     text NOT NULL,
    status      text NOT NULL CHECK (status IN ('redeemed', 'released')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX promo_redemptions_by_user ON pricing.promo_redemptions (code, user_id) WHERE status = 'redeemed';

ALTER TABLE edge.carts ADD COLUMN promo_code text;

-- Rates as fractions (0.0725 = 7.25 %); region '' is the country-wide rate.
CREATE TABLE pricing.tax_rates (
    country   char(2) NOT NULL,
    region    text NOT NULL DEFAULT '',
    standard  numeric(8, 6) NOT NULL CHECK (standard >= 0 AND standard < 1),
    reduced   numeric(8, 6) NOT NULL CHECK (reduced >= 0 AND reduced < 1),
    PRIMARY KEY (country, region)
);
INSERT INTO pricing.tax_rates (country, region, standard, reduced) VALUES
    ('US', 'CA', 0.0725, 0.0000),
    ('US', 'NY', 0.0400, 0.0000),
    ('US', '',   0.0000, 0.0000),
    ('DE', '',   0.1900, 0.0700),
    ('FR', '',   0.2000, 0.0550),
    ('GB', '',   0.2000, 0.0500);

-- methods: {"standard": {"bands": [{"maxGrams": 1000, "price": "4.99"}, ...], "freeOver": "75.00"}, ...}
CREATE TABLE pricing.shipping_zones (
    zone        text PRIMARY KEY,
    countries   text[] NOT NULL,
    currency    char(3) NOT NULL,
    methods     jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pricing.shipping_zones (zone, countries, currency, methods) VALUES
    ('us', ARRAY['US'], 'USD',
     '{"standard": {"bands": [{"maxGrams": 1000, "price": "4.99"}, {"maxGrams": 5000, "price": "9.99"}, {"maxGrams": 30000, "price": "24.99"}], "freeOver": "75.00"},
       "express":  {"bands": [{"maxGrams": 1000, "price": "14.99"}, {"maxGrams": 5000, "price": "24.99"}, {"maxGrams": 30000, "price": "49.99"}]}}'),
    ('europe', ARRAY['DE', 'FR', 'GB', 'NL', 'BE', 'AT', 'IT', 'ES', 'IE', 'DK', 'SE'], 'USD',
     '{"standard": {"bands": [{"maxGrams": 1000, "price": "9.99"}, {"maxGrams": 5000, "price": "19.99"}, {"maxGrams": 30000, "price": "39.99"}], "freeOver": "150.00"},
       "express":  {"bands": [{"maxGrams": 1000, "price": "29.99"}, {"maxGrams": 5000, "price": "44.99"}]}}');
