#!/bin/sh
# compose.yaml's `train` job (the coordinator's operator): `flwr run` of the jacfusion app on
# the two SuperNodes (the owners train, the ServerApp registers their heads in
# /data/results/registry and logs the robustness table), then waits for the run's end.
# Trains once: later starts find /data/results/results.json (RETRAIN=1 trains again).
set -eu
if [ -f /data/results/results.json ] && [ "${RETRAIN:-0}" != 1 ]; then
    echo "train: trained already (/data/results/results.json); RETRAIN=1 trains again"
    exit 0
fi
json() {  # the value of key $1 in the JSON document on stdin (flwr's --format json output)
    python3 -c 'import json, sys
text = sys.stdin.read()
data = json.loads(text[text.index("{"):])
for key in sys.argv[1].split("."):
    data = data[int(key)] if isinstance(data, list) else data[key]
print(data)' "$1"
}
run_id=$(flwr run /data/app hospital-fed --run-config /data/run.toml --format json | json run-id)
echo "train: run $run_id submitted"
flwr log "$run_id" hospital-fed || true   # streams the ServerApp's log until the run ends
while :; do
    status=$(flwr list hospital-fed --run-id "$run_id" --format json | json runs.0.status)
    case "$status" in finished:*) break ;; esac
    sleep 2
done
echo "train: run $run_id $status"
[ "$status" = finished:completed ]
