#!/usr/bin/env bash
# Keep an experiment's progress in the repository, so a fresh clone continues where the last
# commit stopped (runs/ is not tracked and a new machine starts without it).
#   experiments/keep_runs.sh save OUT KEEP     copy OUT's baseline (base.pt), every finished
#                                              run's report.json and plan.json, and every
#                                              finished fidelity study into KEEP
#   experiments/keep_runs.sh restore KEEP OUT  copy them back into OUT where OUT lacks them
# compare reuses a run from its report.json alone, and only when every recorded setting
# (baseline digest included) matches, so a restored run is reused exactly as the original.
# An unfinished search (tune/, no report.json) is not kept: it starts again on a new machine.
set -euo pipefail
mode=${1:?usage: keep_runs.sh save OUT KEEP | restore KEEP OUT}
from=${2:?usage: keep_runs.sh save OUT KEEP | restore KEEP OUT}
to=${3:?usage: keep_runs.sh save OUT KEEP | restore KEEP OUT}
case $mode in save|restore) ;; *) echo "keep_runs.sh: unknown mode $mode (save or restore)" >&2; exit 2;; esac
[ -d "$from" ] || exit 0
copy() {  # copy file $1 to $2 if it is missing there (restore) or differs (save), atomically
    [ -f "$1" ] || return 0
    if [ "$mode" = restore ] && [ -e "$2" ]; then return 0; fi
    cmp -s "$1" "$2" 2>/dev/null && return 0
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.tmp.$$" && mv "$2.tmp.$$" "$2"
}
copy "$from/base.pt" "$to/base.pt"
for report in "$from"/runs/*/report.json; do
    [ -f "$report" ] || continue
    run=$(basename "$(dirname "$report")")
    copy "$(dirname "$report")/plan.json" "$to/runs/$run/plan.json"
    copy "$report" "$to/runs/$run/report.json"  # last: a report marks a finished run
done
for study in "$from"/fidelity-*/fidelity.json; do
    [ -f "$study" ] || continue
    dir=$(basename "$(dirname "$study")")
    for f in "$(dirname "$study")"/*; do
        [ "$f" = "$study" ] || copy "$f" "$to/$dir/$(basename "$f")"
    done
    copy "$study" "$to/$dir/fidelity.json"  # last: it marks a finished study
done
