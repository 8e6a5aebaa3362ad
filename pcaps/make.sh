#!/bin/sh
# Regenerate the shipped captures (all, or the names given) with real programs in the
# namespace lab. Needs root: re-runs itself with sudo when it is not.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
if [ "$(id -u)" -ne 0 ]; then
    exec sudo -- "$0" "$@"
fi
py="$repo/.venv/bin/python"
[ -x "$py" ] || { echo "make.sh: no venv at $repo/.venv (create it first)" >&2; exit 1; }
cd "$repo"
exec "$py" "$here/make.py" "$@"
