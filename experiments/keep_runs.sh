#!/usr/bin/env bash
# Keep an experiment's progress in the repository, so a fresh clone continues where the last
# commit stopped (runs/ is not tracked and a new machine starts without it).
#   experiments/keep_runs.sh save OUT KEEP     copy OUT's baseline (base.pt), every finished
#                                              run's report.json and plan.json, every
#                                              finished fidelity study and an unfinished
#                                              study's fidelity-progress.json into KEEP
#   experiments/keep_runs.sh restore KEEP OUT  copy them back into OUT where OUT lacks them
# compare reuses a run from its report.json alone, and only when every recorded setting
# (baseline digest included) matches, so a restored run is reused exactly as the original.
# An unfinished search (tune/, no report.json) is not kept: it starts again on a new machine; an
# unfinished fidelity study resumes from its kept structures (autoprune fidelity checks that
# every recorded setting matches before it reuses them).
set -euo pipefail
mode=${1:?usage: keep_runs.sh save OUT KEEP | restore KEEP OUT}
from=${2:?usage: keep_runs.sh save OUT KEEP | restore KEEP OUT}
to=${3:?usage: keep_runs.sh save OUT KEEP | restore KEEP OUT}
case $mode in save|restore) ;; *) echo "keep_runs.sh: unknown mode $mode (save or restore)" >&2; exit 2;; esac
if [ ! -d "$from" ]; then  # nothing kept yet is normal; nothing to save is a wrong argument
    [ "$mode" = restore ] && exit 0
    echo "keep_runs.sh: $from is not a folder (usage: keep_runs.sh save OUT KEEP)" >&2; exit 2
fi
tmp=
trap 'rm -f "$tmp"' EXIT
copy() {  # copy file $1 to $2 if it is missing there (restore) or differs (save), atomically
    [ -f "$1" ] || return 0
    if [ "$mode" = restore ] && [ -e "$2" ]; then return 0; fi
    cmp -s "$1" "$2" 2>/dev/null && return 0
    mkdir -p "$(dirname "$2")"
    tmp="$(dirname "$2")/.$(basename "$2").tmp.$$"  # dot-named: no glob here picks it up
    cp "$1" "$tmp" && mv "$tmp" "$2"
    tmp=
}
copy "$from/base.pt" "$to/base.pt"
for report in "$from"/runs/*/report.json; do
    [ -f "$report" ] || continue
    # a run's output set is complete once its manifest.json is in (written last); a restored
    # run has only its report and plan, already kept
    [ "$mode" = save ] && [ ! -f "$(dirname "$report")/manifest.json" ] && continue
    run=$(basename "$(dirname "$report")")
    copy "$(dirname "$report")/plan.json" "$to/runs/$run/plan.json"
    copy "$report" "$to/runs/$run/report.json"  # last: a report marks a finished run
done
for study in "$from"/fidelity-*/fidelity.json; do
    [ -f "$study" ] || continue
    dir=$(basename "$(dirname "$study")")
    for f in "$(dirname "$study")"/*; do
        [ "$f" = "$study" ] || [ "$(basename "$f")" = fidelity-progress.json ] || copy "$f" "$to/$dir/$(basename "$f")"
    done
    copy "$study" "$to/$dir/fidelity.json"  # last: it marks a finished study
    [ "$mode" = save ] && rm -f "$to/$dir/fidelity-progress.json"  # superseded by fidelity.json
done
for progress in "$from"/fidelity-*/fidelity-progress.json; do  # an unfinished study's finished structures
    [ -f "$progress" ] || continue
    dir=$(basename "$(dirname "$progress")")
    [ -f "$from/$dir/fidelity.json" ] || [ -f "$to/$dir/fidelity.json" ] || copy "$progress" "$to/$dir/fidelity-progress.json"
done
