#!/usr/bin/env bash
# The GPU measurements behind docs/benchmarks.md §8 (issue 23), one stage at a time, each writing its JSON and log
# under OUT. Stages run in the order given; a failed stage is reported and the next one runs.
#
#   bash benchmarks/speed_suite.sh OUT levers step step_s2b step_fp8 profile
#   bash benchmarks/speed_suite.sh OUT loop scaling
#
# Stages:
#   levers    per-shape dilated-conv and FP8 1×1 timings (benchmarks/conv_levers.py)
#   kernels   the cross-entropy (eager, compiled) and the teacher's forward (conv epilogues separate, fused)
#             (benchmarks/kernel_levers.py)
#   kernels_ce the cross-entropy alone: eager, compiled, and fused (train.fused_ce) with 4 and 8 warps
#   kernels_pool the student stem's max-pool, forward + backward: compiled, and the Triton kernels (train.fused_maxpool)
#   kernels_metric validation's confusion-matrix update at 1×1024×2048: one set of bins against ConfusionMatrix.lanes
#   tests_kernels the Triton kernels' tests (tests/test_fused_ce.py, tests/test_maxpool.py, CUDA-only ones included)
#   step      compiled teacher-only, CWD and CSKD steps, B = 8, 512×1024, 120 timed iterations (the defaults: on
#             CUDA, ASPP's dilated convs as matrix products per tap row, train.dilated_convs auto → row_taps)
#   step_native the same with train.dilated_convs=native (the library's dilated kernels)
#   step_s2b  the same with train.dilated_convs=space_to_batch
#   step_fp8  the same with train.teacher_precision=fp8
#   step_fused_ce the same with train.fused_ce=true (the cross-entropy of the upsampled logits as one Triton kernel)
#   step_fused_pool the same with train.fused_maxpool=true (the student stem's max-pool as two Triton kernels)
#   step_cg   the same with CUDA graphs over the whole step (--compile-mode reduce-overhead)
#   step_unfused the same with train.teacher_conv_fusion=false (the teacher's conv epilogues as separate kernels)
#   step_stream the same with train.teacher_stream=forward (the teacher on a second CUDA stream, alongside the
#             student's forward), then with train.teacher_stream=pipeline (also alongside the previous backward)
#   profile   torch.profiler over 5 compiled CSKD steps (top kernels; Chrome trace)
#   loop      the real loop: 600 iterations of `cskd distill` on 256 synthetic 1024×2048 PNGs, 14 workers, data.cache
#   loop_warm the loop again, 100 iterations: its first step reads the compile cache the first run wrote (warm start-up)
#   loop_cg   the same with CUDA graphs over the whole step (train.compile_mode=reduce-overhead)
#   startup   a cold start-up: the loop for 40 iterations on 32 PNGs with a new, empty compile-cache folder
#             (the first step's seconds, torch.compile's timers); startup_profile the same under cProfile
#   step_nograph the step with train.teacher_graph=false (the teacher's kernels launched from Python)
#   step_head the step with train.teacher_compile=head (only the teacher's heads compiled)
#   loop_nocache the loop without data.cache: every sample decoded from its PNG (a dataset's first epoch)
#   scaling   compiled CWD and CSKD steps for B ∈ {8, 16} × crops 512×1024, 768×1536, 1024×2048
#   val       validation at 1024×2048 as the Trainer runs it (DeepLabV3-R18, 64 images, 14 workers, 3 rounds)
#   val_native the same with train.dilated_convs=native (eval runs eagerly: the ASPP's row taps unfused, or cuDNN's)
#   val_b2    the same with eval.batch_size=2 (two images per forward: half the launches per image)
#   val_fold  the same with eval.fold_batchnorm=true (a frozen copy: BNs folded, conv epilogues in cuDNN's call)
#   val_compile the same with eval.compile=true (the compiled student; round 1 compiles the eval graph)
#   val_profile the same, with a fourth round under torch.profiler (top kernels; wall against kernel ms per image)
#   tests     the test suite on this machine, 8 pytest workers (CUDA-only tests included where there is a GPU);
#             cskd from this tree (PYTHONPATH), as every stage runs it; needs pytest-xdist and pytest-timeout;
#             the log's last lines name each failed and skipped test (-rfs)
# Environment: DATA (default /tmp/cs_synth) and CACHE (default /tmp/cs_cache) for the loop's images and cache;
# VAL_DATA (default /tmp/cs_val) for the validation images; STEP_ARGS, extra train_step.py arguments for the step
# stages and LOOP_ARGS for the loop stages (later ones win: STEP_ARGS="--device cpu --batch 1 --size 32 64 --iters 2 --warmup 1" checks the plumbing).
set -u
out=${1:?usage: speed_suite.sh OUT STAGE...}
shift
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python}
data=${DATA:-/tmp/cs_synth}
cache=${CACHE:-/tmp/cs_cache}
# shellcheck disable=SC2206  # STEP_ARGS is meant to split into words
step=("$py" "$here/train_step.py" --compile --no-flops --warmup 10 --iters 120 --methods teacher,cwd,cskd ${STEP_ARGS:-})
# shellcheck disable=SC2206
loop=("$py" "$here/train_loop.py" --data "$data" --images 256 --set data.workers=14 ${LOOP_ARGS:-})
val=("$py" "$here/validation.py" --data "${VAL_DATA:-/tmp/cs_val}" --images 64 --set data.workers=14)
# a cold start-up: few images and iterations, its own data (the loop's 256-image folder is kept for the loop stages)
startup=(--data "$data.start" --images 32 --set "data.cache=$cache.start" --iterations 40 --window 20 --step-iters 10)

run() {  # run NAME CMD...: log to OUT/NAME.log, say how it ended
  local name=$1
  shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then
    echo "== $name: done in $((SECONDS - t0)) s"
  else
    echo "== $name: FAILED (exit $?) after $((SECONDS - t0)) s; last lines:"
    tail -n 5 "$out/$name.log"
  fi
}

for stage in "$@"; do
  case $stage in
    levers) run levers "$py" "$here/conv_levers.py" --out "$out/conv_levers_h200.json" ;;
    kernels) run kernels "$py" "$here/kernel_levers.py" --out "$out/kernel_levers_h200.json" ;;
    kernels_ce) run kernels_ce "$py" "$here/kernel_levers.py" --levers ce --out "$out/kernel_levers_ce_h200.json" ;;
    kernels_pool) run kernels_pool "$py" "$here/kernel_levers.py" --levers pool --out "$out/kernel_levers_pool_h200.json" ;;
    kernels_metric) run kernels_metric "$py" "$here/kernel_levers.py" --levers metric --batch 1 --size 1024 2048 \
                      --out "$out/kernel_levers_metric_h200.json" ;;
    tests_kernels) run tests_kernels "$py" -m pytest -q -p no:cacheprovider -rfs "$here/../tests/test_fused_ce.py" \
                     "$here/../tests/test_maxpool.py" ;;
    step) run step "${step[@]}" --out "$out/train_step_h200.json" ;;
    step_fused_pool) run step_fused_pool "${step[@]}" --set train.fused_maxpool=true \
                      --out "$out/train_step_h200_fused_pool.json" ;;
    step_fused_ce) run step_fused_ce "${step[@]}" --set train.fused_ce=true --out "$out/train_step_h200_fused_ce.json" ;;
    step_s2b) run step_s2b "${step[@]}" --set train.dilated_convs=space_to_batch \
                --out "$out/train_step_h200_space_to_batch.json" ;;
    step_fp8) run step_fp8 "${step[@]}" --set train.teacher_precision=fp8 --out "$out/train_step_h200_fp8.json" ;;
    step_unfused) run step_unfused "${step[@]}" --set train.teacher_conv_fusion=false \
                    --out "$out/train_step_h200_unfused.json" ;;
    step_native) run step_native "${step[@]}" --set train.dilated_convs=native \
                   --out "$out/train_step_h200_native.json" ;;
    step_stream)
      for how in forward pipeline; do
        run "step_stream_$how" "${step[@]}" --set "train.teacher_stream=$how" \
          --out "$out/train_step_h200_stream_$how.json"
      done ;;
    step_cg) run step_cg "${step[@]}" --compile-mode reduce-overhead --out "$out/train_step_h200_cudagraphs.json" ;;
    profile) run profile "$py" "$here/train_step.py" --compile --no-flops --warmup 10 --iters 20 --methods cskd \
               --profile cskd ${STEP_ARGS:-} --out "$out/profile_h200.json" ;;
    loop) run loop "${loop[@]}" --set "data.cache=$cache" --iterations 600 --out "$out/train_loop_h200.json" ;;
    loop_warm) run loop_warm "${loop[@]}" --set "data.cache=$cache" --iterations 100 --window 50 --step-iters 10 \
                 --out "$out/train_loop_h200_warm.json" ;;
    loop_cg) run loop_cg "${loop[@]}" --set "data.cache=$cache" --iterations 600 \
               --set train.compile_mode=reduce-overhead --out "$out/train_loop_h200_cudagraphs.json" ;;
    startup) run startup "${loop[@]}" "${startup[@]}" --set "train.compile_cache=$(mktemp -d)" \
               --out "$out/train_loop_h200_startup.json" ;;
    startup_profile) run startup_profile "${loop[@]}" "${startup[@]}" --set "train.compile_cache=$(mktemp -d)" \
                       --cprofile "$out/startup_profile.txt" --out "$out/train_loop_h200_startup_profile.json" ;;
    step_nograph) run step_nograph "${step[@]}" --set train.teacher_graph=false --out "$out/train_step_h200_nograph.json" ;;
    step_head) run step_head "${step[@]}" --set train.teacher_compile=head --out "$out/train_step_h200_head.json" ;;
    loop_nocache) run loop_nocache "${loop[@]}" --iterations 600 --out "$out/train_loop_h200_nocache.json" ;;
    scaling)
      for b in 8 16; do
        for size in "512 1024" "768 1536" "1024 2048"; do
          tag="b${b}_${size// /x}"
          run "scaling_$tag" "$py" "$here/train_step.py" --compile --no-flops --warmup 5 --iters 30 \
            --methods cwd,cskd --batch "$b" --size $size --out "$out/train_step_h200_scaling_$tag.json"
        done
      done ;;
    val) run val "${val[@]}" --out "$out/validation_h200.json" ;;
    val_native) run val_native "${val[@]}" --set train.dilated_convs=native --out "$out/validation_h200_native.json" ;;
    val_b2) run val_b2 "${val[@]}" --set eval.batch_size=2 --out "$out/validation_h200_b2.json" ;;
    val_fold) run val_fold "${val[@]}" --set eval.fold_batchnorm=true --out "$out/validation_h200_fold.json" ;;
    val_compile) run val_compile "${val[@]}" --set eval.compile=true --out "$out/validation_h200_compile.json" ;;
    val_profile) run val_profile "${val[@]}" --rounds 4 --profile --out "$out/validation_h200_profile.json" ;;
    tests) run tests "$py" -m pytest -q -n 8 -p no:cacheprovider --timeout=600 -rfs "$here/../tests" ;;
    *) echo "unknown stage '$stage' (levers kernels kernels_ce kernels_pool kernels_metric tests_kernels step step_fused_ce step_fused_pool step_s2b step_fp8 step_cg step_unfused step_native step_stream profile loop loop_warm loop_cg loop_nocache startup startup_profile step_nograph step_head scaling val val_native val_b2 val_fold val_compile val_profile tests)"; exit 2 ;;
  esac
done
