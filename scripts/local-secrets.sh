# Sourced by up.sh and up-cluster.sh: local secrets, generated once, readable only by us.
# The edge refuses the built-in development JWT secret; `checkout token` reads .run/local.toml
# too (Settings::load), so tokens and the edge agree. NATS users per role (nats/auth.conf) get
# their passwords from .run/nats.env, which nats-server and our processes both read.
mkdir -p .run
if [ ! -f .run/local.toml ] && [ -z "${CHECKOUT__AUTH__JWT_SECRET:-}" ]; then
  (umask 077; printf '# Written once by ./dev up: local secrets, never committed.\n[auth]\njwt_secret = "%s"\n' \
    "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > .run/local.toml)
  echo "generated a JWT secret into .run/local.toml"
fi
# The key that seals payment tokens on the bus (payments.token_keys), added once.
if [ -f .run/local.toml ] && ! grep -q '^token_keys' .run/local.toml \
   && [ -z "${CHECKOUT__PAYMENTS__TOKEN_KEYS:-}" ]; then
  (umask 077; printf '[payments]\ntoken_keys = "%s"\n' \
    "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >> .run/local.toml)
  echo "generated a payment-token key into .run/local.toml"
fi
if [ ! -f .run/nats.env ]; then
  (umask 077; for role in EDGE RESERVE AUTHORIZE ORDER COMPENSATE OPERATOR; do
    echo "CHECKOUT_NATS_${role}_PASSWORD=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  done > .run/nats.env)
fi
# The secret the sandbox signs its webhooks with, and that the edges verify them with.
if [ ! -f .run/psp.env ]; then
  secret="whsec_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  (umask 077; printf 'SANDBOX_PSP_WEBHOOK_SECRET=%s\nCHECKOUT__PSP__WEBHOOK_SECRETS=%s\n' \
    "$secret" "$secret" > .run/psp.env)
fi
set -a; . ./.run/nats.env; . ./.run/psp.env; set +a
