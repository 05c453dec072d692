#!/usr/bin/env bash
# The card's pipeline, a peer and both evaluations on tiny toy data, through the command lines only,
# so that two versions of the code can be run alike and their outputs compared (compare_runs.py):
#
#   git worktree add /tmp/old <commit>
#   results/probes/tiny_pipeline.sh /tmp/old /tmp/ws_old
#   results/probes/tiny_pipeline.sh .        /tmp/ws_new
#   python results/probes/compare_runs.py /tmp/ws_old /tmp/ws_new
#
# ROOT: the code to run; WS: an empty work folder (removed first); PY: the interpreter (default .venv's).
set -euo pipefail
ROOT=$(cd "$1" && pwd); WS=$2; PY=${PY:-$(pwd)/.venv/bin/python}
export OMP_NUM_THREADS=1
rm -rf "$WS"; mkdir -p "$WS"; cd "$WS"
SET="data_path='./data/toy/' img_size=64 num_classes=3 prototype_shape=(15,128,1,1) topk=5 train_batch_size=8
     test_batch_size=16 train_push_batch_size=7 finetune_epochs=1 num_train_epochs=3 num_warm_epochs=1 push_start=1
     push_epochs=[1,2] last_layer_iterations=1 keep_checkpoints=None experiment_run='tiny' num_workers=0"
BASE=saved_models/base/toy_resnet18.pth
$PY "$ROOT/data/make_toy.py" --out data/toy --size 64 --train-per-class 6 --test-per-class 3 --classes 3
$PY "$ROOT/finetune_backbone.py" -dataset toy -set $SET
$PY "$ROOT/gradcam_extract.py" -dataset toy -set $SET
$PY "$ROOT/main.py" -dataset toy -set $SET -train_atts data/grad_train_toy.npy -test_atts data/grad_test_toy.npy -weights $BASE
$PY "$ROOT/train_peer.py" -method gc -dataset toy -set $SET -weights $BASE
FINAL=$(ls saved_models/resnet18/tiny | grep '^2_0push.*\.pth$')
$PY "$ROOT/eval_iou.py" -modeldir saved_models/resnet18/tiny -model "$FINAL" -test_atts data/grad_test_toy.npy -thr 50 \
    -set img_size=64 > eval_iou.out
GC=$(ls saved_models/resnet18/toy_gc | grep '^3epoch.*\.pth$')
$PY "$ROOT/eval_metrics.py" -lvw saved_models/resnet18/tiny/$FINAL -base $BASE -source gc=saved_models/resnet18/toy_gc/$GC \
    -test_atts data/grad_test_toy.npy -out metrics_out -auc_images 3 -spg_samples 5 -dataset toy -set $SET
$PY "$ROOT/visualize.py" saved_models/resnet18/tiny > /dev/null
