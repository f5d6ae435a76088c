#!/bin/sh
# The image's entry point, run by tini. A server started on an empty data volume (and no
# PostgreSQL URL) is set up first, as `openbeepboop-server setup` would; then the command
# replaces this shell (exec), so SIGTERM reaches it and it drains.
set -eu

keys_given() {
    for name in ADMIN NODE CLIENT; do
        for suffix in _KEY _KEY_FILE; do
            if [ -n "$(printenv "OPENBEEPBOOP_${name}${suffix}" || true)" ]; then
                return 0
            fi
        done
    done
    return 1
}

if [ "${1:-}" = "openbeepboop-server" ] && [ "${2:-}" = "start" ] \
    && [ -z "${OPENBEEPBOOP_DATABASE_URL:-}" ] \
    && [ ! -e "${OPENBEEPBOOP_DATA_DIR:-/data}/server.toml" ]; then
    if keys_given; then
        # the keys come from the environment: make no others
        openbeepboop-server setup --non-interactive --no-keys
    else
        # the new keys are printed once, here: `docker logs` shows them
        openbeepboop-server setup --non-interactive
    fi
fi
exec "$@"
