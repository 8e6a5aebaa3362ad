#!/usr/bin/env bash
# egressd checks for a policy repository, for any CI (the GitHub Actions job in
# .github/workflows/egressd.yml runs this). Needs `egressd` on PATH, git and tar; no root.
#
#   POLICY     the policy file the nodes load             (default policies/site.yaml)
#   CAPTURES   directory of NAME.pcap + NAME.expect.yaml  (default captures)
#   BASE_REF   what the change is compared with           (default origin/main)
#   OUT        where diff.json is written                 (default egressd-ci)
#   STRICT_DIFF=1  fail the job when any recorded flow changes verdict or rule
#
# Exit codes (the steps' own codes are 0 ok, 1 check failed, 2 unusable input):
#   0  the policy validates, every expectation holds (flows that change are listed, see
#      STRICT_DIFF)
#   1  the policy does not validate, an expectation does not hold, or (STRICT_DIFF=1) a
#      recorded flow changes
#   2  an input is unusable: a capture that cannot be read, an expectation file that is not
#      valid, a base policy that does not load
set -uo pipefail

POLICY=${POLICY:-policies/site.yaml}
CAPTURES=${CAPTURES:-captures}
BASE_REF=${BASE_REF:-origin/main}
OUT=${OUT:-egressd-ci}
STRICT_DIFF=${STRICT_DIFF:-0}
mkdir -p "$OUT"
status=0

echo "== 1. egressd validate $POLICY"
egressd validate "$POLICY"
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "the policy does not validate (exit $rc): every problem is listed above with file:line"
    exit 1
fi
egressd validate --print-merged "$POLICY" > "$OUT/merged.yaml" || exit 2

echo "== 2. egressd test --expect (every capture with an expectation file)"
shopt -s nullglob
for expect in "$CAPTURES"/*.expect.yaml; do
    stem=${expect%.expect.yaml}
    cap=""
    for c in "$stem.pcap" "$stem.pcapng"; do [ -f "$c" ] && cap=$c; done
    if [ -z "$cap" ]; then
        echo "$expect: no capture $stem.pcap or $stem.pcapng beside it"
        exit 2
    fi
    egressd test "$cap" --policy "$POLICY" --expect "$expect" --only-flagged --no-progress
    rc=$?
    case $rc in
        0) ;;
        1) status=1 ;;  # listed above: which flow, what was expected, what happened
        *) echo "$cap: unusable input (exit $rc)"; exit 2 ;;
    esac
done

echo "== 3. egressd diff $BASE_REF -> this change"
captures=("$CAPTURES"/*.pcap "$CAPTURES"/*.pcapng)
if [ "${#captures[@]}" -eq 0 ]; then
    echo "no captures: nothing to compare"
elif ! git cat-file -e "$BASE_REF:$POLICY" 2>/dev/null; then
    echo "$POLICY does not exist at $BASE_REF: nothing to compare"
else
    base=$(mktemp -d)
    trap 'rm -rf "$base"' EXIT
    git archive "$BASE_REF" | tar -x -C "$base" || exit 2
    egressd diff "$base/$POLICY" "$POLICY" "${captures[@]}" --json > "$OUT/diff.json"
    rc=$?
    egressd diff "$base/$POLICY" "$POLICY" "${captures[@]}"
    case $rc in
        0) echo "no recorded flow changes verdict or rule" ;;
        1) echo "recorded flows change (listed above, and in $OUT/diff.json): review them"
           [ "$STRICT_DIFF" = 1 ] && status=1 ;;
        *) echo "diff: unusable input (exit $rc)"; exit 2 ;;
    esac
fi
exit $status
