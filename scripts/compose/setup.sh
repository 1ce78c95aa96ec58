#!/bin/sh
# compose.yaml's `setup` job: the operators' out-of-band steps of the hospital scenario, run
# once into fresh volumes. What the README's multi-host walkthrough copies between machines
# by hand is copied here between the parties' volumes (/parties/<party>, each later mounted
# at /data by that party's services only):
#   coordinator  the SuperLink's and the coordinator's certificate, the owners' SuperNode
#                public keys, the evaluation labels (pseudonyms and labels: no ids), the
#                Flower app folder, the run config and the flwr CLI's connection
#   image-owner, audio-owner
#                the owner's certificate and SuperNode key, the pseudonym key
#   hospital     the requester's certificate, the pseudonym key, its labels, the ids to predict
# The CA's private key is made in this container's tmpfs and dropped: no party holds it.
set -eu
P=/parties
DATA=${JACFUSION_DATA:-builtin:avdigits?seed=0&quick=1}
if [ -f "$P/coordinator/pki/cert.pem" ]; then
    echo "setup: done already (\`docker compose down -v\` removes the volumes, to start afresh)"
    exit 0
fi
umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The coordinator's operator: a CA and one certificate per party, for the compose service
# names. The SuperLink's certificate names `superlink` (dialled by the SuperNodes and the flwr
# CLI) and 127.0.0.1 (its own SuperExec, as it binds 0.0.0.0).
jacfusion-fed certs --out "$work/pki" \
    --coordinator-name "coordinator@superlink,coordinator,127.0.0.1" \
    --owner "image-owner=image@image-owner" --owner "audio-owner=audio@audio-owner" \
    --requester hospital
mkdir -p "$P/coordinator/pki" "$P/coordinator/supernodes" "$P/hospital/pki"
cp "$work"/pki/coordinator/ca.pem "$work"/pki/coordinator/cert.pem \
    "$work"/pki/coordinator/key.pem "$P/coordinator/pki/"
for owner in image-owner audio-owner; do
    mkdir -p "$P/$owner/pki"
    cp "$work/pki/owners/$owner"/* "$P/$owner/pki/"
    cp "$work/pki/owners/$owner/supernode_auth.pub" "$P/coordinator/supernodes/$owner.pub"
done
cp "$work"/pki/requesters/hospital/* "$P/hospital/pki/"

# The hospital: the pseudonym key (to each owner, never to the coordinator), the labels of its
# evaluation patients (to the coordinator) and the test ids it will ask about.
jacfusion-fed deploy key --out "$P/hospital/pseudonym.key"
for owner in image-owner audio-owner; do cp "$P/hospital/pseudonym.key" "$P/$owner/"; done
JACFUSION_CACHE="$work/cache" jacfusion-fed deploy labels --data "$DATA" --modality image \
    --pseudonym-key "$P/hospital/pseudonym.key" --out "$P/hospital/eval-labels.json"
cp "$P/hospital/eval-labels.json" "$P/coordinator/eval-labels.json"
seq -f 'avdigits-test-%06g' 0 "$((${JACFUSION_TEST_IDS:-100} - 1))" > "$P/hospital/test-ids.txt"

# The coordinator: the app folder, the run config of `flwr run`, the flwr CLI's connection.
jacfusion-fed deploy app --out "$P/coordinator/app"
cat > "$P/coordinator/run.toml" <<TOML
run-dir = "/data/results"
labels-file = "/data/eval-labels.json"
dataset = "avdigits"
perturbed = "audio"
epochs = ${JACFUSION_EPOCHS:-20}
repeats = 1
TOML
if [ -n "${JACFUSION_COLUMNS:-}" ]; then  # the table's columns (default: the paper's Table 1)
    printf 'columns = "%s"\n' "$JACFUSION_COLUMNS" >> "$P/coordinator/run.toml"
fi
mkdir -p "$P/coordinator/.flwr"
cat > "$P/coordinator/.flwr/config.toml" <<TOML
[superlink]
default = "hospital-fed"

[superlink.hospital-fed]
address = "superlink:9093"
root-certificates = "/data/pki/ca.pem"
TOML
echo "setup: certificates, keys, labels and the app folder are in the parties' volumes"
