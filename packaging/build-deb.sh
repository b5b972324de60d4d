#!/usr/bin/env bash
# Builds dist/attune-sensor_<version>_all.deb from the working tree's committed-or-not files,
# in a scratch copy (dpkg-buildpackage writes next to the source tree), then runs lintian.
# The build runs the unit tests (pybuild). Build dependencies: packaging/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)
# pyenv's shims on PATH break dpkg-buildpackage; the system toolchain is what Debian builds with.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
scratch=$(mktemp -d /var/tmp/attune-build-XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/src"
# Only the files git knows about (tracked or new, not ignored): no .venv, no caches.
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$scratch/src"
if [ -n "${ATTUNE_DEB_VERSION:-}" ]; then
  # A throwaway newer version, for the upgrade test: a changelog entry in the scratch copy only.
  { printf 'attune-sensor (%s) unstable; urgency=medium\n\n  * Test build.\n\n -- %s  %s\n\n' \
      "$ATTUNE_DEB_VERSION" "$(dpkg-parsechangelog -l debian/changelog -S Maintainer)" "$(date -R)"
    cat debian/changelog; } > "$scratch/src/debian/changelog"
fi
(cd "$scratch/src" && dpkg-buildpackage -us -uc -b >"$scratch/build.log" 2>&1) || {
  tail -60 "$scratch/build.log" >&2
  echo "build-deb: dpkg-buildpackage failed (log above)" >&2
  exit 1
}
mkdir -p dist
rm -f dist/attune-sensor_*.deb
cp "$scratch"/attune-sensor_*_all.deb dist/
deb=$(ls dist/attune-sensor_*_all.deb)
echo "built $deb"
# Errors and warnings fail the build; overrides carry their reasons in debian/*.lintian-overrides.
lintian --fail-on error,warning --no-tag-display-limit "$deb"
