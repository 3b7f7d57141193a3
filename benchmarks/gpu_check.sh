#!/usr/bin/env bash
# One prepared GPU pass: build the extension for this machine's torch, run the test suite (CUDA tests
# included), then the benchmarks, writing logs and JSON results to OUTDIR.
#
#   bash benchmarks/gpu_check.sh OUTDIR [stages]
#
# stages (comma-separated, default "build,test,ops,train"):
#   build  compile hybrid_accel._C in place (CUDA kernels required), with the ptxas resource report
#   test   pytest: tests/test_ops.py in full, then the rest of the suite (-x, skips what needs wandb)
#   ops    benchmarks/bench_ops.py (kernel timings, copy-bandwidth roofline)
#   train  benchmarks/bench_train.py (DCR vs plain throughput, DII update cost), if present
#   opstest  pytest tests/test_ops.py alone
#   diag   the C++ error path in isolation (direct dispatcher call with bad shapes), with a backtrace on a crash
#   amp    the trainer for 200 steps under bf16 and under fp16 autocast (both networks, DII and DCR, all ops):
#          the run must end with finite losses (a NaN/inf loss stops the trainer with a non-zero status)
#   repro  the reproduction suite's gpu preset (benchmarks/run_suite.py --preset gpu) on hybrid CVC-ClinicDB,
#          which needs ../shared/data/cvc-clinicdb copied into the tree first (see docs/reproduce.md)
#   cpu    CPU mode: build without CUDA and run the same steps on the CPU (a dry run of this script)
# At most 8 files come back from the device tool, so logs are grouped per stage.
set -u -o pipefail
OUT=${1:?usage: gpu_check.sh OUTDIR [stages]}
STAGES=${2:-build,test,ops,train}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYBRID_ACCEL_BACKEND=auto
# ImageNet weights (model.pretrained=imagenet) without the pip package on the device: convert them here
# once (python -c "from hybrid_accel.weights import imagenet_weights as w; w('tf_efficientnet_lite0', '.cache/hybrid_accel/weights')")
# and carry .cache/hybrid_accel with the tree; the trainer reads the cached file before looking for the package.
export HYBRID_ACCEL_CACHE=${HYBRID_ACCEL_CACHE:-$PWD/.cache/hybrid_accel}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
DEV=cuda
BUILD_CUDA=1
if has cpu; then DEV=cpu; BUILD_CUDA=0; fi
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  nvcc --version 2>/dev/null | tail -1
} > "$OUT/summary.txt" 2>&1

if has build; then
  stamp "build (HYBRID_ACCEL_BUILD_CUDA=$BUILD_CUDA)"
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")}
  export HYBRID_ACCEL_CUDA_ARCHS=${HYBRID_ACCEL_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  rm -rf build hybrid_accel/_C*.so
  if HYBRID_ACCEL_BUILD_CUDA=$BUILD_CUDA $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    stamp "build ok"
  else
    stamp "BUILD FAILED (see build.log)"; tail -30 "$OUT/build.log"; exit 1
  fi
  if [ "$BUILD_CUDA" = 1 ] && command -v cuobjdump > /dev/null; then
    cuobjdump --dump-resource-usage hybrid_accel/_C*.so 2>&1 | grep -E "Function|REG" | sed 's/^[[:space:]]*//' >> "$OUT/build.log"
  fi
  $PY -c "import hybrid_accel.ops as o, torch; print('ext', o.extension_available(), 'cuda kernels', o._ext.ext_has_kernel('grad_dot', 'cuda'))" | tee -a "$OUT/summary.txt"
fi

if has test; then
  stamp "tests: ops"
  $PY -m pytest tests/test_ops.py -q -rs -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  stamp "ops tests rc=$? : $(tail -1 "$OUT/pytest.log")"
  stamp "tests: rest of the suite"
  timeout 240 $PY -m pytest tests -q -x -p no:cacheprovider --ignore=tests/test_ops.py \
    -k "not two_process and not multi_process" >> "$OUT/pytest.log" 2>&1
  stamp "suite rc=$? : $(tail -1 "$OUT/pytest.log")"
fi

if has opstest; then
  stamp "tests: ops only"
  $PY -m pytest tests/test_ops.py -q -rs -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  stamp "ops tests rc=$? : $(tail -1 "$OUT/pytest.log")"
fi

if has diag; then
  stamp "diag: C++ error path"
  cat > /tmp/ha_diag.py <<'PYEOF'
import faulthandler, sys, torch
faulthandler.enable()
import hybrid_accel.ops  # noqa: F401  (loads the library)
dev = sys.argv[1]
for name, call in [
    ("aten mm bad shapes", lambda: torch.mm(torch.randn(2, 3, device=dev), torch.randn(4, 5, device=dev))),
    ("grad_dot bad shapes", lambda: torch.ops.hybrid_accel.grad_dot(torch.randn(2, 4, 10, device=dev), torch.randn(3, 3, 10, device=dev), torch.randn(1, 3, 4, device=dev), None)),
]:
    try:
        call()
        print(name, "-> no error?!", flush=True)
    except RuntimeError as e:
        print(name, "-> RuntimeError:", str(e).splitlines()[0][:160], flush=True)
PYEOF
  for d in cpu cuda; do
    timeout 60 $PY /tmp/ha_diag.py $d >> "$OUT/diag.log" 2>&1; echo "rc($d)=$?" >> "$OUT/diag.log"
  done
  if grep -q "rc(cpu)=139\|rc(cuda)=139" "$OUT/diag.log" && command -v cuda-gdb > /dev/null; then
    timeout 120 cuda-gdb -batch -ex run -ex bt --args $PY /tmp/ha_diag.py cpu 2>&1 | tail -40 >> "$OUT/diag.log"
  fi
  stamp "diag done: $(grep -c RuntimeError "$OUT/diag.log") errors caught"
fi

if has ops; then
  stamp "bench_ops ($DEV)"
  preset=gpu; [ "$DEV" = cpu ] && preset=smoke
  $PY benchmarks/bench_ops.py --device "$DEV" --preset $preset --min-run-time 0.3 --out "$OUT/bench_ops.json" > "$OUT/bench_ops.log" 2>&1
  stamp "bench_ops rc=$?"
fi

if has train && [ -f benchmarks/bench_train.py ]; then
  stamp "bench_train ($DEV)"
  if [ "$DEV" = cuda ]; then
    args="--device cuda --backbone resnet50 --size 512 --batch 16 --amp bf16"
  else
    args="--device cpu --backbone resnet18 --size 64 --batch 4"
  fi
  timeout 300 $PY benchmarks/bench_train.py $args --out "$OUT/bench_train.json" --profile "$OUT/profile_dcr.txt" \
    > "$OUT/bench_train.log" 2>&1
  stamp "bench_train rc=$?"
fi
if has amp; then
  for mp in bf16 fp16; do
    stamp "amp: 200 trainer steps under $mp"
    [ "$DEV" = cpu ] && steps=4 || steps=200
    timeout 100 $PY -m hybrid_accel.train train.steps=$steps method.strong_warmup=$((steps / 2)) \
      train.mixed_precision=$mp log.tracking=none \
      log.progress=false eval.every=100000 checkpoint.every=100000 dii.tau=50 train.batch_size=8 \
      data.synthetic_dir=/tmp/ha_amp_data data.synthetic_size=128 'data.image_size=[128,128]' \
      out_dir=/tmp/ha_amp_$mp >> "$OUT/amp.log" 2>&1
    rc=$?
    stamp "amp $mp rc=$rc: $(grep -iE 'nan|inf|test' "$OUT/amp.log" | tail -2 | tr '\n' ' ')"
  done
fi
if has repro && [ -f benchmarks/run_suite.py ]; then
  stamp "reproduce: gpu preset"
  if [ "$DEV" = cpu ]; then  # a dry run of the whole pipeline: tiny step count and image size
    timeout 540 $PY benchmarks/run_suite.py --preset gpu --out /tmp/ha_repro_cpu --jobs 1 --methods full few-strong \
      -- train.steps=4 method.strong_warmup=2 dii.tau=1 eval.every=2 train.batch_size=2 "data.image_size=[64,80]" \
      'train.mixed_precision="no"' data.num_workers=0 train.cpu=true > "$OUT/reproduce.log" 2>&1
  else
    timeout 540 $PY benchmarks/run_suite.py --preset gpu --out /tmp/ha_repro > "$OUT/reproduce.log" 2>&1
  fi
  stamp "reproduce rc=$?"
fi
stamp "done"
# the device tool returns at most 8 files: pack the logs when there are more
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if [ "$n" -gt 7 ]; then
  (cd "$OUT" && tar czf logs.tar.gz --exclude=summary.txt --exclude=logs.tar.gz --exclude='*.json' -- *.log *.txt 2>/dev/null \
    && find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.txt' \) ! -name summary.txt -delete)
fi
