#!/bin/bash
# The CUDA checks and benchmarks, in one run on a CUDA machine (the project installed, or its
# dependencies importable). Writes every log under OUT_DIR (default ./gpu_check) and prints them.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#     STEPS="gpu_tests bench_graphs" bash benchmarks/gpu_check.sh   # only the named steps
#
# In order (step names in brackets):
# [machine] GPU, torch, whether TensorRT / ONNX Runtime's GPU providers are importable;
# [gpu_tests] `pytest -m gpu` (tiny world: CUDA against CPU, CUDA graphs against eager);
# [cuda_vs_cpu] the default world on CUDA against CPU: per-step latent gap, one seed and actions;
# [bench_f32] [bench_bf16] bench_env.py on CUDA, float32 eager (with CarRacing-v3 on this machine's
#   CPU) and bfloat16 eager;
# [ppo] PPO in imagination on CUDA (world and policy), SB3's own fps, one real episode;
# [bench_bf16_compile] bfloat16 + torch.compile (84x84, large batches);
# [bench_graphs] CUDA graphs: torch.compile mode "reduce-overhead" in float32 and bfloat16, beside eager;
# [ppo_seeds] only when STEPS names it: PPO agents trained in imagination on CUDA, every world x seed at
#   once on the one GPU (65,536 steps each, `--episodes 0`; evaluate them on a CPU afterwards, the
#   command in docs/EXPERIMENTS.md). PPO_WORLDS (default "hold"): shipped names or world directories
#   (carry one under runs/); PPO_SEEDS (default "0 1 2"). Writes OUT_DIR/ppo/<world>_s<seed>/ppo.zip.
# [train_world] only when STEPS names it: examples/train_world.sh on CUDA (record the `hold` recipe's
#   data with every core, without video; encode; fine-tune the default world's DiT + heads, batch 64,
#   TRAIN_STEPS (default 3000) but at most TRAIN_MINUTES (default 4) and no later than the step's own
#   deadline; build), working in TRAIN_DIR (default /tmp/mw_train_world, kept while the machine stays
#   warm: every stage resumes, so a call that ran out of time is continued by the same call).
#   Writes OUT_DIR/train_world.tgz (the world without its VAE, which is the default world's, and
#   train_dit.json with the step reached). TRAIN_FLAGS: more train-dit flags (EXTRA of train_world.sh).
set -u
OUT_DIR=${1:-gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD SDL_VIDEODRIVER=dummy
PY=${PYTHON:-python3}
NE="1 16 64 256 1024"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT_DIR/NAME.txt, never stop the script
    local name=$1 limit=$2; shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
    echo "=== $name: $*"
    /usr/bin/time -f "[$name] wall %e s, peak RSS %M KiB, rc %x" timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
}

step machine 60 bash -c "nvidia-smi -L; $PY - <<'EOF'
import importlib.util, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for mod in ('tensorrt', 'torch_tensorrt', 'onnxruntime'):
    print(mod, 'importable' if importlib.util.find_spec(mod) else 'missing')
if importlib.util.find_spec('onnxruntime'):
    import onnxruntime as ort
    print('onnxruntime', ort.__version__, ort.get_available_providers())
EOF"
step gpu_tests 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/
step cuda_vs_cpu 120 $PY - <<'EOF'
import numpy as np
from matrix_env.env import MatrixWorldEnv
actions = [3, 3, 3, 1, 1, 1, 2, 2, 0, 4, 4, 4] * 2  # 24 steps, several action meanings

def latents(device: str) -> np.ndarray:
    env = MatrixWorldEnv(obs_type="latent", device=device)
    obs, _ = env.reset(seed=0)
    out = [obs] + [env.step(a)[0] for a in actions]
    return np.stack(out)  # (25, C, H, W)

cpu, gpu = latents("cpu"), latents("cuda")
gap = np.abs(cpu - gpu).reshape(len(cpu), -1)
print("default world, seed 0, 24 steps: latent RMS", float(np.sqrt((cpu ** 2).mean())))
print("step | max abs gap | mean abs gap")
for t in (0, 1, 2, 4, 8, 12, 16, 20, 24):
    print(f"{t} | {gap[t].max():.2e} | {gap[t].mean():.2e}")
EOF
step bench_f32 150 $PY benchmarks/bench_env.py --device cuda --steps 120 --num-envs $NE
step bench_bf16 100 $PY benchmarks/bench_env.py --device cuda --dtype bfloat16 --steps 120 --num-envs $NE --no-carracing
step ppo 150 $PY examples/ppo_in_imagination.py --world default --device cuda --num-envs 64 --n-steps 128 --timesteps 16384 \
    --frame-stack 2 --dtype bfloat16 --episodes 1 --no-baselines
step bench_bf16_compile 150 $PY benchmarks/bench_env.py --device cuda --dtype bfloat16 --compile-model --steps 120 \
    --num-envs 256 1024 --no-hd --no-carracing
step bench_graphs 240 bash -c "$PY benchmarks/bench_env.py --device cuda --steps 120 --num-envs 16 256 --no-hd \
    --no-carracing && $PY benchmarks/bench_env.py --device cuda --compile-model --compile-mode reduce-overhead \
    --steps 120 --num-envs 16 256 --no-hd --no-carracing && $PY benchmarks/bench_env.py --device cuda --dtype bfloat16 \
    --compile-model --compile-mode reduce-overhead --steps 120 --num-envs 16 256 1024 --no-hd --no-carracing"
if [[ " ${STEPS:-} " == *" ppo_seeds "* ]]; then
    export OUT_DIR PY PPO_WORLDS=${PPO_WORLDS:-hold} PPO_SEEDS=${PPO_SEEDS:-0 1 2}
    step ppo_seeds 540 bash -c 'for w in $PPO_WORLDS; do for s in $PPO_SEEDS; do
        name=$(basename "$w")_s$s
        $PY examples/ppo_in_imagination.py --world "$w" --seed "$s" --device cuda --num-envs 16 --n-steps 128 \
            --frame-stack 2 --timesteps 65536 --save-every 16384 --run-dir "$OUT_DIR/ppo/$name" --episodes 0 \
            > "$OUT_DIR/ppo_$name.log" 2>&1 &
    done; done; wait
    for f in "$OUT_DIR"/ppo_*.log; do echo "== $f"; tail -n 2 "$f"; done; ls -l "$OUT_DIR"/ppo/*/ppo.zip'
fi
if [[ " ${STEPS:-} " == *" train_world "* ]]; then
    TRAIN_DIR=${TRAIN_DIR:-/tmp/mw_train_world}
    # ends 30 s inside the step's limit: train-dit's budget shrinks to what recording left
    step train_world 570 env PY="$PY" DEVICE=cuda STEPS="${TRAIN_STEPS:-3000}" BATCH=64 LR=2e-4 \
        MAX_MINUTES="${TRAIN_MINUTES:-4}" DEADLINE=$(( $(date +%s) + 540 )) NUM_WORKERS=8 EXTRA="${TRAIN_FLAGS:-}" \
        bash examples/train_world.sh "$TRAIN_DIR"
    if [ -f "$TRAIN_DIR/world/dit.safetensors" ]; then  # the VAE is the default world's: restore it with cp
        tar czf "$OUT_DIR/train_world.tgz" -C "$TRAIN_DIR" --exclude=vae.safetensors world run/model/train_dit.json
        ls -l "$OUT_DIR/train_world.tgz"
    fi
fi
