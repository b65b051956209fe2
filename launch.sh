#!/usr/bin/env bash
# Thin wrapper over `accelerate launch trainer/main.py`.
#
#   ./launch.sh                                    # the offline demo on the CPU (demo_world.yaml)
#   ./launch.sh --config trainer/configs/dav2_small_mobilevit_xs.yaml data.train_dir=photos/
#   ACCELERATE_CONFIG=multi_gpu ./launch.sh --config ... [--resume latest] [section.key=value ...]
#   ./launch.sh --accelerate-config cpu_2proc --config trainer/configs/demo.yaml
#
# ACCELERATE_CONFIG (or --accelerate-config) names a file in accelerate_configs/ (default: cpu
# when no GPU is visible, single_gpu otherwise). `accelerate launch` flags (--num_processes 4,
# --main_process_port 29501, ...) go to the launcher wherever they stand; everything else goes to
# trainer/main.py. Multi-node: set MACHINE_RANK and MAIN_PROCESS_IP on every node.
# Exit code: the trainer's (README, "Exit codes"); SIGTERM/Ctrl-C save a resumable state, exit 0.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

if [[ "${1:-}" == "--accelerate-config" ]]; then
    ACCELERATE_CONFIG="$2"
    shift 2
fi
if [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
    if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        ACCELERATE_CONFIG=single_gpu
    else
        ACCELERATE_CONFIG=cpu
    fi
fi
config_file="accelerate_configs/${ACCELERATE_CONFIG%.yaml}.yaml"
if [[ ! -f "$config_file" ]]; then
    echo "error: no accelerate config '$config_file'; choose one of: $(ls accelerate_configs | sed 's/.yaml//' | tr '\n' ' ')" >&2
    exit 1
fi
if [[ "$ACCELERATE_CONFIG" == cpu* ]]; then
    export ACCELERATE_USE_CPU=true  # needed for a real multi-process gloo run without GPUs
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        # Unasked, accelerate gives each CPU process (physical cores / processes) threads and prints
        # a three-line warning about it on every start: make the same choice here, silently.
        processes=$(sed -n 's/^num_processes: *\([0-9][0-9]*\).*/\1/p' "$config_file")
        for ((i = 1; i < $#; i++)); do
            [[ "${!i}" == --num_processes ]] && next=$((i + 1)) && processes=${!next}
        done
        for arg in "$@"; do
            [[ "$arg" == --num_processes=* ]] && processes=${arg#*=}
        done
        processes=$(( ${processes:-1} > 0 ? ${processes:-1} : 1 ))
        cores=$(python -c "import psutil; print(psutil.cpu_count(logical=False) or 1)")
        export OMP_NUM_THREADS=$(( cores / processes > 1 ? cores / processes : 1 ))
    fi
fi
if [[ $# -eq 0 ]]; then
    # The demo: render its scenes (kept between runs; a few seconds the first time), then distil.
    python -m data.synthetic --out runs/worlds/demo_train --count 192 --size 128x128 --world train
    python -m data.synthetic --out runs/worlds/demo_test --count 16 --size 128x128 --world test
    set -- --config trainer/configs/demo_world.yaml --overwrite
fi
extra=()
if [[ "$ACCELERATE_CONFIG" == multi_node* && -z "${MACHINE_RANK:-}" ]]; then
    echo "error: multi_node needs MACHINE_RANK (0 on the main node, 1, 2, ... on the others) and MAIN_PROCESS_IP" >&2
    exit 1
fi
[[ -n "${MACHINE_RANK:-}" ]] && extra+=(--machine_rank "$MACHINE_RANK")
[[ -n "${MAIN_PROCESS_IP:-}" ]] && extra+=(--main_process_ip "$MAIN_PROCESS_IP")
# trainer.launch is `accelerate launch` that passes the trainer's exit code and signals through.
exec python -m trainer.launch --config_file "$config_file" "${extra[@]}" "$@"
