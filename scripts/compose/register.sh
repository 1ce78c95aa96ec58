#!/bin/sh
# compose.yaml's `register` job (the coordinator's operator): register each owner's SuperNode
# public key with the SuperLink (TLS, SuperNode authentication), unless it is registered.
set -eu
for key in /data/supernodes/*.pub; do
    out=$(flwr supernode register "$key" hospital-fed --format json 2>&1) || true
    case "$out" in
        *'"success": true'*) echo "registered $(basename "$key" .pub)" ;;
        *[Aa]lready*) echo "registered already: $(basename "$key" .pub)" ;;
        *) echo "$out" >&2; echo "error: could not register $key" >&2; exit 1 ;;
    esac
done
