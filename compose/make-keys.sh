#!/bin/sh
# Write the CurveZMQ key pairs of the compose topology (docs/security.md):
#   keys/public/<node>.key   every node's public key and kind (brokers and presence with the endpoint
#                            they bind): mounted read-only into every node as its
#                            cluster_keys_dir
#   keys/<node>.env          SIGNALPOST_NODE_SECRET_KEY=... for that node only (its env_file;
#                            compose reads it on the host, so no secret file has to be
#                            readable by the container's user); for brokers and presence
#                            also SIGNALPOST_TICKET_SECRET=... (the seat tickets' secret,
#                            shared by them, never given to an edge)
# Run once before `docker compose up`; never commit keys/. Refuses to overwrite a key.
#   compose/make-keys.sh            the nodes of docker-compose.yml
#   compose/make-keys.sh regions    the nodes of docker-compose.regions.yml (eu-*, us-*: one
#                                   seat tickets' secret for the brokers and presence of both)
#   SIGNALPOST="python -m signalpost.cli" compose/make-keys.sh   (without an installed CLI)
set -eu
SIGNALPOST=${SIGNALPOST:-signalpost}
KEYS_DIR=${KEYS_DIR:-$(cd "$(dirname "$0")" && pwd)/keys}
mkdir -p "$KEYS_DIR/public"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077
$SIGNALPOST keys --dir "$work" --ticket-secret >/dev/null
ticket_secret=$(cat "$work/ticket.secret")

node() {
    name=$1
    kind=$3
    shift
    $SIGNALPOST keys --dir "$work" --name "$name" "$@" >/dev/null
    secret=$(sed -n 's/^ *secret-key = "\(.*\)"$/\1/p' "$work/$name.key_secret")
    [ -n "$secret" ] || { echo "make-keys: no secret key written for $name" >&2; exit 1; }
    [ ! -e "$KEYS_DIR/$name.env" ] || { echo "make-keys: $KEYS_DIR/$name.env exists" >&2; exit 1; }
    printf 'SIGNALPOST_NODE_SECRET_KEY=%s\n' "$secret" >"$KEYS_DIR/$name.env"
    if [ "$kind" != edge ]; then
        printf 'SIGNALPOST_TICKET_SECRET=%s\n' "$ticket_secret" >>"$KEYS_DIR/$name.env"
    fi
    chmod 644 "$work/$name.key"
    mv "$work/$name.key" "$KEYS_DIR/public/$name.key"
}

case "${1:-}" in
"")
    node presence-1 --kind presence --endpoint tcp://presence-1:5565
    node presence-2 --kind presence --endpoint tcp://presence-2:5565
    node broker-1 --kind broker --endpoint tcp://broker-1:5555
    node broker-2 --kind broker --endpoint tcp://broker-2:5555
    node edge-1 --kind edge
    node edge-2 --kind edge
    ;;
regions)
    for region in eu us; do
        node "$region-presence-1" --kind presence --endpoint "tcp://$region-presence-1:5565"
        node "$region-broker-1" --kind broker --endpoint "tcp://$region-broker-1:5555"
        node "$region-broker-2" --kind broker --endpoint "tcp://$region-broker-2:5555"
        node "$region-edge-1" --kind edge
        node "$region-edge-2" --kind edge
    done
    ;;
*)
    echo "make-keys: unknown topology '$1' (none, or regions)" >&2
    exit 2
    ;;
esac
echo "keys written to $KEYS_DIR"
