#!/usr/bin/env bash
# Builds the real-Letta tier's environment: letta==0.16.8 with its exact pins (constraints.txt, from the tag's
# uv.lock), pgserver (PostgreSQL 16 + pgvector binaries), Letta's Alembic scripts from its sdist, and letta-bus
# installed beside Letta (editable, from this checkout) under the same pins.
#
# Cached by the hash of constraints.txt, pyproject.toml and this script: a second run installs nothing but the
# editable letta-bus link (a few seconds). Prints the environment's directory on its last line.
#   LETTA_BUS_LETTA_CACHE  where environments live (default ~/.cache/letta-bus)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${LETTA_BUS_LETTA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/letta-bus}"
key="$(cat "$here/constraints.txt" "$here/build_env.sh" "$repo/pyproject.toml" | sha256sum | cut -c1-16)"
env_dir="$cache/letta-0.16.8-$key"
py="${PYTHON:-python3}"
log() { echo "build_env: $*" >&2; }

if [ ! -f "$env_dir/.ready" ]; then
  log "building $env_dir (about 4 minutes on 2 cores)"
  rm -rf "$env_dir"
  mkdir -p "$env_dir"
  "$py" -m venv "$env_dir/venv"
  pip="$env_dir/venv/bin/pip"
  "$pip" install --quiet --upgrade pip  # pip 23.2 crashes on lxml[html-clean]
  # letta[postgres] without psycopg2 (a source build needing pg_config; Letta uses asyncpg and, for Alembic, pg8000)
  "$pip" install --quiet -c "$here/constraints.txt" letta==0.16.8 pgvector pg8000 pgserver==0.1.4
  # The wheel has no Alembic scripts; the sdist does (167 versions).
  "$pip" download --quiet --no-deps --no-binary :all: letta==0.16.8 -d "$env_dir/sdist"
  tar -xzf "$env_dir/sdist/letta-0.16.8.tar.gz" -C "$env_dir/sdist"
  # letta-bus's own dependencies under Letta's pins (the resolver fails here if they clash).
  "$pip" install --quiet -c "$here/constraints.txt" -e "$repo"
  touch "$env_dir/.ready"
  # Older environments of this cache are stale once the key changes.
  find "$cache" -maxdepth 1 -name 'letta-0.16.8-*' ! -name "letta-0.16.8-$key" -exec rm -rf {} + 2>/dev/null || true
else
  # Point the editable letta-bus at this checkout (a clone may live anywhere); dependencies are already there.
  "$env_dir/venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$repo"
fi
echo "$env_dir"
