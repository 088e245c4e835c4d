#!/bin/sh
# The PostgreSQL server for the tests against a real server (tests/pgserver.py, tests/test_postgres.py),
# from Debian's packages. Idempotent: does nothing when initdb, pg_ctl and postgres are there.
#   sh tests/install_postgres.sh
set -eu

for d in $(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/pg_ctl)") /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
        echo "install_postgres: $("$d/postgres" --version) already installed in $d"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_postgres: apt-get not found; install the PostgreSQL server so that initdb, pg_ctl and postgres" >&2
    echo "are on PATH or in /usr/lib/postgresql/VERSION/bin (Debian/Ubuntu package: postgresql)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_postgres: not root and no sudo; run as root: apt-get install -y postgresql" >&2
        exit 1
    fi
fi

echo "install_postgres: installing postgresql from Debian's packages"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# the package's own cluster is not needed (the tests run initdb in a temporary folder) and is not started
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/postgres
