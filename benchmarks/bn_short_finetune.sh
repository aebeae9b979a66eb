#!/bin/bash
# Short fine-tunes (16 distillation steps, batch 64) of one compress output, with and without
# --reparametrize-bn, BN in training mode (lr 0.01) or frozen (lr 5e-4); evaluated on 2000 test images.
# Usage: bash benchmarks/bn_short_finetune.sh [OUT]   (default runs/bn-short; docs/compress.md's figures were
# made with OUT=/tmp/bnft and are committed under docs/results/compress/r20-bn-short)
set -e
cd "$(dirname "$0")/.."
O=${1:-runs/bn-short}
mkdir -p "$O"
T=docs/results/train_runs/r20-vanilla-cpu60-s0
C="--model cifar_resnet20 --weights $T/checkpoints/last.pt --budget 0.5 --rule eq6 --data-dir ../shared/data/cifar10 --threads 2 --seed 0"
[ -f "$O/plain.pt" ] || .venv/bin/compconv compress $C --out "$O/plain.pt"
[ -f "$O/rep.pt" ] || .venv/bin/compconv compress $C --reparametrize-bn --out "$O/rep.pt"
F="--teacher $T --dataset cifar10 --data-dir ../shared/data/cifar10 --epochs 1 --batch-size 64 --max-steps 16 --eval-subset 2000 --threads 2 --out-dir $O/runs --no-progress --set tensorboard=false --set plots=false --seed 0"
for spec in "plain-bn-lr0.01 plain.pt --lr 0.01" "plain-frozen-lr5e-4 plain.pt --lr 5e-4 --freeze-bn-stats" \
            "rep-bn-lr0.01 rep.pt --lr 0.01" "rep-frozen-lr5e-4 rep.pt --lr 5e-4 --freeze-bn-stats"; do
  set -- $spec; name=$1; file=$2; shift 2
  [ -f "$O/runs/$name/results.json" ] || .venv/bin/compconv train --init "$O/$file" $F --name "$name" "$@"
done
for f in plain rep; do .venv/bin/compconv eval "$O/$f.pt" --eval-subset 2000 --no-progress --threads 2; done
