#!/usr/bin/env bash
# Checks the operations files: alert rules (syntax and unit tests), the live /metrics exposition
# that the integration tests saved, and that every dashboard query names a family we export.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v promtool >/dev/null || { echo "promtool missing: apt-get install prometheus" >&2; exit 1; }
python3 scripts/partition-auth.py --check nats/cluster/auth.conf 3
echo "nats/cluster/auth.conf: matches nats/auth.conf for 3 partitions"
promtool check rules ops/prometheus/alerts.yml
(cd ops/prometheus && promtool test rules alerts.test.yml)
sample=target/metrics-sample.prom
[ -s "$sample" ] || { echo "$sample missing: run the tests first (they save a live /metrics)" >&2; exit 1; }
promtool check metrics < "$sample"
echo "metrics exposition: ok ($(grep -c '^# TYPE' "$sample") families)"
python3 - "$sample" <<'PY'
import json, re, sys
exported = set(re.findall(r'^# TYPE (\S+)', open(sys.argv[1]).read(), re.M))
dash = json.load(open("ops/grafana/checkout.json"))
missing = []
for panel in dash["panels"]:
    for target in panel["targets"]:
        for name in re.findall(r'\b(checkout_[a-z_]+?)(?:_bucket|_count|_sum)?\b', target["expr"]):
            base = re.sub(r'_(bucket|count|sum)$', '', name)
            if base not in exported:
                missing.append((panel["title"], name))
if missing:
    sys.exit(f"dashboard queries name families /metrics does not export: {missing}")
print(f"dashboard: ok ({len(dash['panels'])} panels)")
PY
