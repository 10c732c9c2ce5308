#!/usr/bin/env bash
# Fashion-MNIST comparison for one CIFAR-style model: every arm at 50% of the FLOPs (and at
# SECOND_BUDGET if set, e.g. 30%), 5 seeds, paired statistics, compute accounting, then FastNAS
# and proxy fidelity (24 structures per budget). Usage: experiments/fashion_mnist.sh MODEL [OUT].
#
# Phased, so that whatever finishes is a complete table: (1) every arm but selfgroup and
# fastnas at 50%, (2) proxy fidelity at 50% (fidelity-50/), then selfgroup at 50%, beside
# (3) fastnas at 50% (selfgroup fine-tunes ~6x slower than the dense arms on this CPU, ~3.5 min
# a run on ResNet-20: it keeps every channel and evaluates grouped; fastnas searches ~8 min a
# run on ResNet-20, ~13 on ResNet-56, and is skipped with one line without the peers extra);
# only with SECOND_BUDGET: (4) every arm but selfgroup at both budgets, (5) proxy fidelity at
# the second budget beside (6) selfgroup at it (a second budget about doubles the time, beyond
# the two hours a model is meant to take on the 2-core machine). Every phase rewrites results.* from all
# finished runs; running the script again after an interruption reuses every finished run
# (only when all its settings match), resumes an interrupted search and reuses a finished
# fidelity study with the same settings (an interrupted one resumes from the structures it
# finished; one measured on another baseline is measured again).
#
# Two cores, used side by side (one torch thread per process, OMP_NUM_THREADS=1 unless set;
# the baseline, trained alone, with BASE_THREADS=2):
# in phases 1 and 4 the width arms (one process) run beside the search arms (random, search,
# search_widths: 2 trial workers), the reference arm search before its ablation; phases 2 and
# 3 (and 5 and 6) run beside each other. A run's wall time is therefore measured beside
# other work (three processes on two cores in phases 1 and 4), as its report's compute
# record says nothing of; the README says so beside the tables. Ctrl-C (or SIGTERM to the
# script) stops both sides; the script exits once both have.
#
# Choices, for a 2-core CPU machine (measured times in the README):
#  - 16x16 images; the dense baseline trained once on all 55,000 training images (5,000 more
#    are the validation split, the official 10,000 the test set), 15 epochs (about 75 s each);
#  - fine-tuning (every arm, same recipe) on a stratified 10,000-image subset for 2 epochs: at
#    mild budgets on real data a long fine-tune erases structure differences, and 10k x 2
#    keeps a run near half a minute;
#  - the authors' DI greedy in 2%-of-FLOPs steps (the authors use 0.5%; 4x fewer steps);
#  - search, random and search_widths: resnet_cifar space, 16 trials, 2 workers (1 thread each).
# Copy results.*, fidelity.* and the plots to docs/results/fashion_mnist_MODEL/ when it finishes.
#
# Progress is kept in the repository: KEEP (default docs/results/fashion_mnist_MODEL) receives
# the baseline, every finished run's report and plan, every finished fidelity study and an
# unfinished one's finished structures (fidelity-progress.json) after
# each phase and when the script exits (experiments/keep_runs.sh; `keep_runs.sh save OUT KEEP`
# by hand keeps a running phase's finished runs), and a fresh clone restores them first, so
# the next machine continues where the last commit stopped (runs/ is not tracked).
#
# Per-model choices (environment, defaults for ResNet-20): BASE_EPOCHS (15), GREEDY_STEP
# (0.02), SECOND_BUDGET (empty: phases 4-6 skipped; e.g. 30%), ARMS (the arms of phases 1 and 4, in
# the order they run). fashion_mnist_resnet56.sh sets them.
set -euo pipefail
export RAY_AUTH_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
model=${1:?usage: experiments/fashion_mnist.sh MODEL [OUT]}
out=${2:-runs/fashion_mnist_$model}
ap=${AUTOPRUNE:-autoprune}
keep=${KEEP:-docs/results/fashion_mnist_$model}
here=$(dirname "$0")
mkdir -p "$out"
"$here/keep_runs.sh" restore "$keep" "$out"
save() { "$here/keep_runs.sh" save "$out" "$keep"; }
trap save EXIT  # also what an interrupted or failed phase finished (not after SIGKILL)
base="$out/base.pt"
if [ ! -f "$base" ]; then
    OMP_NUM_THREADS=${BASE_THREADS:-2} $ap train --model "$model" --data fashion-mnist --image-size 16 --epochs "${BASE_EPOCHS:-15}" --seed 0 \
        --out "$base" --no-progress
    save
fi
common=(--checkpoint "$base" --data fashion-mnist --image-size 16 --train-size 10000 --seeds 0 1 2 3 4
        --epochs 2 --space resnet_cifar --trials 16 --workers 2 --out "$out" --no-progress)
arms=${ARMS:-uniform,greedy,wsp,tp_global,random,search,search_widths}
widths= searches=  # phase 1's two sides: the width arms, and the arms the search runner runs
for arm in ${arms//,/ }; do
    case $arm in random|search|search_widths) searches+=${searches:+,}$arm;; *) widths+=${widths:+,}$arm;; esac
done
fidelity() {  # proxy fidelity at one budget, into its own folder (a finished study with the same settings is reused)
    $ap fidelity --checkpoint "$base" --data fashion-mnist --image-size 16 --train-size 10000 \
        --flops "$1" --n 24 --epochs 2 --space resnet_cifar --out "$out/fidelity-${1%\%}" --no-progress
}
compare() {  # the greedy's step only where --methods lists the greedy (compare refuses it otherwise)
    local a prev= step=()
    for a in "$@"; do
        if [ "$prev" = --methods ] && [[ ",$a," == *,greedy,* ]]; then step=(--greedy-step "${GREEDY_STEP:-0.02}"); fi
        prev=$a
    done
    $ap compare "${common[@]}" ${step[@]+"${step[@]}"} "$@"
}
side_by_side() {  # run "$1" and "$2" (each a command line in a string) at once; fail if either fails
    # Each side runs as a process group of its own (job control on); Ctrl-C or SIGTERM to this
    # script is passed on to both groups as SIGINT (each stops cleanly, an interrupted search
    # saving its state) and the script waits until both have stopped, so the progress saved on
    # exit is theirs and a rerun cannot overlap them.
    local a b p r rc=0 stop=
    set -m
    eval "$1" & a=$!
    eval "$2" & b=$!
    set +m
    trap 'stop=130; kill -INT -- "-$a" "-$b" 2>/dev/null' INT
    trap 'stop=143; kill -INT -- "-$a" "-$b" 2>/dev/null' TERM
    for p in "$a" "$b"; do
        while :; do
            wait "$p" && r=0 || r=$?
            kill -0 "$p" 2>/dev/null || break  # else a trapped signal interrupted the wait
        done
        [ "$r" = 0 ] || rc=$r
    done
    trap - INT TERM
    [ -z "$stop" ] || exit "$stop"
    return "$rc"
}
side() {  # one side of phase 1 or 4: a compare of the arms in $1 at the budgets after it (none: nothing)
    local which=$1; shift
    [ -z "$which" ] || compare "$@" --methods "$which"
}
time side_by_side "side '$widths' --flops 50%" "side '$searches' --flops 50%"
compare --flops 50% --methods "$arms"  # the table of all of phase 1's runs (each reused)
save
time side_by_side "fidelity 50% && side selfgroup --flops 50%" "side fastnas --flops 50%"
compare --flops 50% --methods "$arms,selfgroup,fastnas"  # the table of every 50% run (each reused)
save
second=${SECOND_BUDGET-}
[ -n "$second" ] || exit 0
time side_by_side "side '$widths,fastnas' --flops 50% '$second'" "side '$searches' --flops 50% '$second'"
compare --flops 50% "$second" --methods "$arms,fastnas"
save
time side_by_side "fidelity '$second'" "compare --flops 50% '$second' --methods '$arms,selfgroup,fastnas'"
save
