#!/usr/bin/env bash
# Check deploy/ciss.service: its syntax (systemd-analyze verify) and its sandbox (systemd-analyze security).
#
# Usage: deploy/check-unit.sh [UNIT_FILE]        (default: ciss.service beside this script)
# Exit status: 0 when both checks pass, 1 when one fails, 77 when this machine cannot run them
# (no systemd-analyze, or one older than systemd 250 without --offline/--threshold).
#
# Safe on a clean CI box, as root or not: it creates no user, installs nothing, and only writes a copy of the
# unit into a temporary folder that it removes.
set -euo pipefail

# Exposure score x 10 that the unit may not exceed. The unit scores 1.4 ("OK"); lowering the sandbox in any
# way raises the score and fails this check. Lower this number when the unit gets stricter.
THRESHOLD=14

unit=${1:-"$(dirname "$(readlink -f "$0")")/ciss.service"}
name=$(basename "$unit")

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-unit: skipped: systemd-analyze is not installed (apt-get install systemd)" >&2
    exit 77
fi
if ! systemd-analyze --help 2>/dev/null | grep -q -- '--offline'; then
    echo "check-unit: skipped: $(systemd-analyze --version | head -n 1) lacks --offline; systemd 250 or newer is needed" >&2
    exit 77
fi
if [[ ! -f $unit ]]; then
    echo "check-unit: FAIL: $unit does not exist" >&2
    exit 1
fi

# verify refuses a unit whose ExecStart binary is missing, and /opt/ciss is not installed in CI: check a copy
# whose commands point at /bin/true instead. Everything else is checked as written.
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
sed -E 's#^(ExecStart(Pre|Post)?|ExecStop(Post)?|ExecReload)=.*#\1=/bin/true#' "$unit" > "$workdir/$name"

# verify exits 0 on unknown keys and bad values (it only warns), so any warning about this unit fails the
# check. The one tolerated warning is the service user missing on this machine.
set +e
verify_output=$(systemd-analyze verify --man=no "$workdir/$name" 2>&1)
verify_status=$?
set -e
problems=$(printf '%s\n' "$verify_output" | grep -F "$name" \
    | grep -viE '(user|group).*ciss.*(not found|no such|unknown|does not exist|resolve)' || true)
if [[ $verify_status -ne 0 || -n $problems ]]; then
    echo "check-unit: FAIL: systemd-analyze verify $unit:" >&2
    printf '%s\n' "$verify_output" | sed "s#$workdir/#$(dirname "$unit")/#g" >&2
    exit 1
fi
echo "check-unit: verify: OK"

set +e
security_output=$(systemd-analyze security --offline=true --threshold="$THRESHOLD" "$unit" 2>&1)
security_status=$?
set -e
score=$(printf '%s\n' "$security_output" | grep -F 'Overall exposure level' || true)
if [[ -z $score ]]; then
    echo "check-unit: FAIL: systemd-analyze security gave no exposure score:" >&2
    printf '%s\n' "$security_output" >&2
    exit 1
fi
echo "check-unit: security: ${score#→ }"
if [[ $security_status -ne 0 ]]; then
    echo "check-unit: FAIL: exposure is above $THRESHOLD/10; the items marked ✗ above the score cost it:" >&2
    printf '%s\n' "$security_output" | grep '✗' >&2 || true
    exit 1
fi
echo "check-unit: security: OK (threshold $THRESHOLD/10)"
