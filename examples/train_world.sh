#!/bin/bash
# A world from recorded data in one go: record the `hold` recipe's four data sets (the README's
# seeds: labelled driving, unlabelled randomised-colour footage, exits, open-loop holds), encode them
# with the init world's VAE, fine-tune the init world's DiT and heads on them, build the world.
#
#     bash examples/train_world.sh OUT              # the README's `hold` recipe (2,400 steps of batch 16)
#     DEVICE=cuda STEPS=8000 BATCH=64 LR=2e-4 MAX_MINUTES=4 NUM_WORKERS=8 bash examples/train_world.sh OUT
#
# Every stage resumes: rerun the same command after a kill. Writes OUT/data/<set> (recordings),
# OUT/latents/<set>, OUT/run (train-dit's run dir) and OUT/world (the world: load it with
# gym.make("MatrixWorld-v0", world="OUT/world"), probe it with `matrix-world probe --checkpoint`).
# Settings (environment variables, defaults in brackets):
#   INIT [matrix_env/worlds/default]  world whose VAE encodes the data and whose DiT + heads start training
#   EPISODES ["80 12 24 48"]  episodes of the labelled, unlabelled, exit and hold sets; EP_STEPS [250] each
#   WORKERS [nproc]  recorder processes per set; NO_VIDEO [1]: record without the 720p video (the DiT
#     never reads it; machines without ffmpeg can record)
#   DEVICE [auto]  encode and train on cpu / cuda; STEPS [2400] the schedule's length; MAX_MINUTES []
#     a wall-clock budget for train-dit (it stops, checkpoints and exports at the step it reached);
#     DEADLINE [] a Unix time by which the script must be done: train-dit's budget is cut to end
#     BUILD_SECONDS [60] before it (for a call with a hard time limit)
#   BATCH [16], LR [1e-4], NUM_WORKERS [0] (DataLoader workers), EXTRA [] more train-dit flags
#     (e.g. "--leave-weight 3"), PY [python3]
set -euo pipefail
OUT=${1:?usage: bash examples/train_world.sh OUT}
PY=${PY:-python3}
INIT=${INIT:-$(dirname "$0")/../matrix_env/worlds/default}
read -r N_LAB N_UNL N_EXIT N_HOLD <<<"${EPISODES:-80 12 24 48}"
EP_STEPS=${EP_STEPS:-250}
WORKERS=${WORKERS:-$(nproc)}
DEVICE=${DEVICE:-auto}
VIDEO=()
if [ "${NO_VIDEO:-1}" = 1 ]; then VIDEO=(--no-video); fi
mw() { echo "+ matrix-world $*"; "$PY" -m agents.cli "$@"; }

rec() {  # rec SET EPISODES SEED [FLAGS...]: one of the README's data sets, its seed and policy
    local set=$1 n=$2 seed=$3; shift 3
    mw record --env CarRacing-v3 --episodes "$n" --steps "$EP_STEPS" --workers "$WORKERS" --seed "$seed" "$@" \
        ${VIDEO[@]+"${VIDEO[@]}"} --out "$OUT/data/$set"
}

mkdir -p "$OUT"
rec carracing "$N_LAB" 0
rec carracing_unlabelled "$N_UNL" 10000 --unlabelled
rec carracing_exit "$N_EXIT" 5000 --policy exit
rec carracing_hold "$N_HOLD" 30000 --policy hold

SETS="carracing carracing_unlabelled carracing_exit carracing_hold"
D=() L=()
for s in $SETS; do
    mw encode-latents --data "$OUT/data/$s" --vae "$INIT" --out "$OUT/latents/$s" --device "$DEVICE" --bf16
    D+=("$OUT/data/$s") L+=("$OUT/latents/$s")
done

MINUTES=${MAX_MINUTES:-}
if [ -n "${DEADLINE:-}" ]; then  # what is left of the call, less the time to evaluate and build
    MINUTES=$("$PY" -c "import sys, time; left = (float(sys.argv[1]) - time.time() - float(sys.argv[2])) / 60
print(min([max(1e-3, left)] + [float(m) for m in sys.argv[3:] if m]))" "$DEADLINE" "${BUILD_SECONDS:-60}" "$MINUTES")
fi
BUDGET=()
if [ -n "$MINUTES" ]; then BUDGET=(--max-minutes "$MINUTES"); fi
STEPS=${STEPS:-2400}
DONE=$("$PY" -c "import json, sys; print(int(json.load(open(sys.argv[1]))['steps'] >= int(sys.argv[2])))" \
    "$OUT/run/model/train_dit.json" "$STEPS" 2>/dev/null || echo 0)
if [ "$DONE" = 1 ]; then  # a finished run is not reloaded, re-evaluated and re-exported
    echo "train-dit: $OUT/run has trained its $STEPS steps already"
else
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    mw train-dit --data "${D[@]}" --latents "${L[@]}" --run-dir "$OUT/run" --init-from "$INIT" --preset S \
        --steps "$STEPS" --batch-size "${BATCH:-16}" --lr "${LR:-1e-4}" --warmup 50 --ema-decay 0.999 \
        --ctx-noise 0.5 --road-weight 3 --bf16 --ckpt-every 200 --num-workers "${NUM_WORKERS:-0}" \
        --device "$DEVICE" ${BUDGET[@]+"${BUDGET[@]}"} ${EXTRA:-}
fi

if [ "$OUT/world/dit.safetensors" -nt "$OUT/run/model/train_dit.json" ]; then
    echo "world written to $OUT/world (already built from this run's model)"
    exit 0
fi
mw build-world --vae "$INIT" --dit "$OUT/run/model" --data "$OUT/data/carracing" "$OUT/data/carracing_unlabelled" \
    --latents "$OUT/latents/carracing" "$OUT/latents/carracing_unlabelled" --out "$OUT/world" --starts 32 \
    --mode pipelined --steps-per-shift 1 --ctx-noise 0.4 --level-shift 2
echo "world written to $OUT/world"
