#!/usr/bin/env bash
# Rerun the GPU measurements behind experiments/results/<device>/ on one NVIDIA GPU.
#
#   bash experiments/reproduce_gpu.sh [OUT_DIR] [STEP ...]
#
# STEP is any of: tests variants kernels profile engine engine-sync engine-graphs engine-seqs reference
# grouping mfu quant-diagnose quant-tune quant-profile quant-sweep quant-kernels quant-engine gqsa-speed
# gqsa-engine gqsa-accuracy gqsa-reference (default: all, in that order), and the shorter
# variants-one-row, variants-decode, quant-engine-batch1 (parts of variants and quant-engine),
# quant-profile-16, quant-wl-probe, quant-tune-decode, quant-descend-decode, quant-batch1-wrapperless, quant-kernels-decode (decode-sized parts of quant-tune and quant-kernels),
# quant-engine-throughput (part of quant-engine), gqsa-tune, gqsa-engine-s50 (W4S50 parts of
# gqsa-speed and gqsa-engine), gqsa-engine-tables (batch-1 W4S50 under several BSR tables),
# gqsa-engine-gathered (16 sequences on the block-map kernel), profile-bsr-call, gqsa-tune-packed, gqsa-engine-packed (batch-1 W4S50
# packed into one array per layer, against dense W4 and the four-array layout),
# profile-batch1, profile-batch1-sparse, batch1-graphs, profile-mixed, engine-buckets, engine-512, decode-alibi,
# decode-alibi-ab, group-tiles, kv-write, profile-kv-writes, engine-kv-writes, batch1-stacked, batch1-stacked-gqsa, decode-short-tables, engine-context-buckets, flash-mqa, profile-decode512, product-probe, step-gemms, prefill-tiles, engine-ab, engine-random-ab, engine-page-size, engine-token-budget, engine-output-major, engine-output-major-all, engine-kv-write-kernel, profile-kv-write-kernel, rope-kv-write, engine-rope-kv-write, add-norm-kernel, engine-fast-options, engine-defaults-ab, engine-small-op-defaults, engine-batch1-small-ops, flash-triton-peer, row-block-speed, variants-256, variants-256-occupancy, quant-tune-256 and dispatch-cost; sharding-8b and sharding-70b need two GPUs
# (machine kind nvidia-h200-x2) and are not in the default list. Each step writes its JSON/markdown (and logs) under OUT_DIR (default
# experiments/results/latest) and runs under its own time limit, so one slow step cannot eat
# the others; with OPTGQA_DEADLINE (epoch seconds) set, no step runs past it. The commit is read
# from git, or from OPTGQA_COMMIT where .git is absent. OPTGQA_TEST_WORKERS: pytest workers of
# the tests step (default 8; pytest-xdist); OPTGQA_TEST_FILES: its test files (default: every
# kernel test file).
set -u
out=${1:-experiments/results/latest}
shift || true
steps=${*:-tests variants kernels profile engine engine-sync engine-graphs engine-seqs reference grouping mfu quant-diagnose quant-tune quant-profile quant-sweep quant-kernels quant-engine gqsa-speed gqsa-engine gqsa-accuracy gqsa-reference}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export OPTGQA_COMMIT=${OPTGQA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# Token ids from `train_reference.py --save-tokens DIR`, for machines without SmolLM2's files.
tokens=(${OPTGQA_TOKENS:+--tokens "$OPTGQA_TOKENS"})
engine_args=(--model llama3-8b --max-num-seqs 256 --kv-memory-gib 48 --fuse-projections)

run() {  # run NAME SECONDS CMD...: one step, its output in OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  if [ -n "${OPTGQA_DEADLINE:-}" ]; then  # epoch seconds by which every step must have ended
    local left=$(( OPTGQA_DEADLINE - $(date +%s) ))
    if [ "$left" -lt 20 ]; then echo "== $name skipped: past OPTGQA_DEADLINE"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $?; log: $out/$name.log"
}

# the engine benchmarks' 512-sequence setting (issue 13's fixed and random workloads)
ENGINE512=(--model llama3-8b --max-num-seqs 512 --kv-memory-gib 48 --fuse-projections
           --max-num-batched-tokens 4096)

# engine_turns PREFIX ROUNDS LABEL=FLAGS ...: bench_engine.py at the 512-sequence setting once
# per LABEL with its extra FLAGS (split on spaces; may be empty), in turns, ROUNDS times; run
# i of LABEL writes OUT/PREFIX_LABEL_i{.log,/}. OPTGQA_ROUNDS (e.g. "2") runs only those
# rounds, so one comparison can be spread over several calls. A LABEL starting with "old"
# runs the older tree at OPTGQA_OLD_TREE (from its root; its results name the commit
# OPTGQA_OLD_COMMIT) and is skipped where that is unset.
engine_turns() {
  local prefix=$1 rounds=$2 i spec label flags abs
  shift 2
  abs=$(cd "$out" && pwd)
  for i in ${OPTGQA_ROUNDS:-$(seq "$rounds")}; do
    for spec in "$@"; do
      label=${spec%%=*}
      read -r -a flags <<< "${spec#*=}"
      if [[ $label == old* ]]; then
        [ -n "${OPTGQA_OLD_TREE:-}" ] || continue
        (cd "$OPTGQA_OLD_TREE" && out=$abs && OPTGQA_COMMIT=${OPTGQA_OLD_COMMIT:-older-tree} \
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run \
          "${prefix}_${label}_$i" 240 python experiments/bench_engine.py "${ENGINE512[@]}" \
          ${flags[@]+"${flags[@]}"} --out "$abs/${prefix}_${label}_$i")
        continue
      fi
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "${prefix}_${label}_$i" 240 python \
        experiments/bench_engine.py "${ENGINE512[@]}" ${flags[@]+"${flags[@]}"} \
        --out "$out/${prefix}_${label}_$i"
    done
  done
}

for step in $steps; do
  case $step in
    tests)  # every kernel test, compiled for the GPU
      # several workers share the GPU (compilation is most of the time), memory taken as needed
      XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
        run gpu_kernel_tests 600 python -m pytest -q -n "${OPTGQA_TEST_WORKERS:-8}" \
        -p no:cacheprovider ${OPTGQA_TEST_FILES:-tests/test_paged_attention.py tests/test_flash_attention.py \
        tests/test_paged_prefill_attention.py tests/test_attention_dispatch.py \
        tests/test_quant_matmul.py tests/test_quant_matmul_options.py tests/test_bsr_quant_matmul.py \
        tests/test_bsr_gather_quant_matmul.py tests/test_packed_bsr.py tests/test_layer_stack.py \
        tests/test_bsr_gm_quant_matmul.py tests/test_dequant_kernel.py tests/test_sparse.py \
        tests/test_tuning.py tests/test_kv_write.py tests/test_rope_kv_write.py \
        tests/test_add_rms_norm.py tests/test_row_block_quant_matmul.py} ;;
    kernels)  # the kernel table: all shapes, peers, ALiBi on and off
      run bench_kernels 600 python experiments/bench_kernels.py --out "$out" ;;
    decode-alibi)  # every decode shape with the defaults, and five configs each timed with
      # and without ALiBi (bench_kernels_alibi_*.md)
      run bench_kernels_alibi 300 python experiments/bench_kernels.py --only decode --sweep-alibi \
        --out "$out/alibi" ;;
    decode-alibi-ab)  # ALiBi against without at every decode shape, 5 interleaved rounds
      run alibi_ab 400 python experiments/alibi_ab.py --rounds 5 --out "$out/alibi_ab" ;;
    decode-short-tables)  # 28/4 with the short-table rule (PagedAttentionConfig.for_backend's
      # max_context): ALiBi against without and the previous defaults at every 28/4 shape, then
      # 28/4 against 32/8 at the engine's shape in both dtypes
      run alibi_ab_28x4 300 python experiments/alibi_ab.py --rounds 5 --shape 28/4 \
        --out "$out/alibi_ab_28x4"
      for dt in bfloat16 float16; do
        run "group_tiles_ab_$dt" 200 python experiments/group_tiles_ab.py --rounds 3 \
          --dtype "$dt" --out "$out/group_tiles_ab_$dt"
      done ;;
    engine-context-buckets)  # the fixed 1000 x 256/256 workload with block tables cut to
      # 1024 tokens (EngineConfig.context_buckets) and without, alternating
      for run_i in 1 2; do
        for cb in none 1024; do
          flag=(); [ "$cb" != none ] && flag=(--context-buckets "$cb")
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "bench_engine_context_${cb}_$run_i" 240 \
            python experiments/bench_engine.py "${engine_args[@]}" "${flag[@]}" \
            --out "$out/engine_context_buckets/${cb}_$run_i"
        done
      done ;;
    group-tiles)  # 28/4 tile settings against 32/8 at the engine's decode shape, both dtypes
      for dt in bfloat16 float16; do
        run "group_tiles_ab_$dt" 200 python experiments/group_tiles_ab.py --rounds 3 \
          --dtype "$dt" --out "$out/group_tiles_ab_$dt"
      done ;;
    kv-write)  # one layer's K/V write into the pool: the engine's scatter and index hints
      run kv_write_bench 150 python experiments/kv_write_bench.py --out "$out/kv_write" ;;
    flash-mqa)  # the flash tile sweep on the MQA shape (B=4 T=4096 32/1) beside cuDNN
      run bench_kernels_flash_mqa 600 python experiments/bench_kernels.py --only flash --sweep \
        --shape "K=1 " --out "$out/flash_mqa" ;;
    profile-decode512)  # one decode step of 482 sequences, contexts 257-512: the fixed
      # workload's mean decode step at max_num_seqs=512
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run profile_decode_b482 240 python \
        experiments/profile_decode.py --quick --fuse-projections --batch 482 --context 257 512 \
        --out "$out/profile_decode_b482" ;;
    profile-kv-writes)  # the fixed workload's mean decode step (482 sequences) and mean mixed
      # step, each with the K/V writes as the engine does them and sorted and unique
      # (EngineConfig.sorted_kv_writes): step time and per-op trace
      for flag in --no-sorted-kv-writes --sorted-kv-writes; do
        tag=_sorted; [ "$flag" = --no-sorted-kv-writes ] && tag=""
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "profile_decode_b482$tag" 240 python \
          experiments/profile_decode.py --quick --fuse-projections --batch 482 \
          --context 257 512 $flag --out "$out/profile_kv_writes/decode_b482$tag"
        run "profile_mixed_fixed$tag" 240 python experiments/profile_mixed.py \
          --fuse-projections --prompts 14 --prompt-len 256 --decodes 370 --context 257 512 \
          --tokens 4096 $flag --out "$out/profile_kv_writes/mixed_fixed$tag"
      done ;;
    profile)  # one decode step, pipelined and synchronous
      run profile_decode 300 python experiments/profile_decode.py --quick --fuse-projections \
        --out "$out" ;;
    profile-batch1)  # one batch-1 decode step, bfloat16 against W4 g128, with command buffers
      # (CUDA graphs) off and on: where the W4 step's time goes outside its layer products
      # (device trace per XLA op, kernels per step)
      for fmt in bf16 w4g128; do
        q=(); [ "$fmt" = bf16 ] || q=(--quantize "$fmt")
        for mode in off on; do   # explicit both ways (the engine's default is on at batch 1)
          x=(--xla-option xla_gpu_enable_command_buffer= --xla-option xla_gpu_ftz=true)
          [ "$mode" = on ] && x=(--xla-option \
            xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla-option xla_gpu_ftz=true)
          run "profile_decode_batch1_${fmt}_$mode" 240 python experiments/profile_decode.py --quick \
            --fuse-projections --batch 1 --context 257 512 "${q[@]}" "${x[@]}" \
            --out "$out/profile_batch1_${fmt}_$mode"
        done
      done ;;
    profile-batch1-sparse)  # one batch-1 decode step, dense W4 against W4S50, command buffers
      # on (the engine's default): where W4S50's step loses the time its layer products save
      for fmt in w4g128 w4g128s50; do
        run "profile_decode_batch1_${fmt}" 240 python experiments/profile_decode.py --quick \
          --fuse-projections --batch 1 --context 257 512 --quantize "$fmt" \
          --out "$out/profile_batch1_${fmt}"
      done ;;
    batch1-graphs)  # batch-1 decode, bfloat16 / W4 / W4S50, with and without XLA command
      # buffers (CUDA graphs): on the H100 a step's host launch time was ~15 us per kernel
      # (profile_decode at 0f4dc1a), so a batch-1 step of ~500 kernels is bound by the host
      for mode in off on; do   # explicit both ways (the engine's default is on at batch 1)
        x=(--xla-option xla_gpu_enable_command_buffer= --xla-option xla_gpu_ftz=true)
        [ "$mode" = on ] && x=(--xla-option \
          xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL --xla-option xla_gpu_ftz=true)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "gqsa_engine_batch1_$mode" 300 python \
          experiments/gqsa_eval.py --part engine --engine-formats bf16,w4g128,w4g128s50 \
          --sequences 1 --resume "${x[@]}" --out "$out/engine_batch1_$mode"
      done ;;
    engine)  # the issue's workload: GQA, its MHA twin and Hugging Face generate in one run
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_engine 600 python experiments/bench_engine.py \
        "${engine_args[@]}" --compare-mha --hf-requests 1000 --hf-batch-size 256 \
        --out "$out/engine" ;;
    engine-sync)  # GQA with synchronous steps (the host waits for each step's tokens)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_engine_sync 300 python \
        experiments/bench_engine.py "${engine_args[@]}" --no-async-scheduling \
        --out "$out/engine_sync" ;;
    engine-graphs)  # GQA with XLA command buffers (CUDA graphs) on
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_engine_graphs 300 python \
        experiments/bench_engine.py "${engine_args[@]}" \
        --xla-option xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL \
        --xla-option xla_gpu_ftz=true --out "$out/engine_graphs" ;;
    reference)  # the reference MHA models (RoPE and ALiBi), checkpoints under checkpoints/
      run train_reference 600 python experiments/train_reference.py "${tokens[@]}" \
        --out "$out/reference" ;;
    engine-kv-writes)  # the fixed 1000 x 256/256 workload at 512 sequences with the K/V
      # writes sorted and unique (EngineConfig.sorted_kv_writes) and without, alternating
      for run_i in 1 2; do
        for flag in --no-sorted-kv-writes --sorted-kv-writes; do
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "bench_engine_kv_writes${flag#--}_$run_i" 240 \
            python experiments/bench_engine.py "${ENGINE512[@]}" "$flag" \
            --out "$out/engine_kv_writes/${flag#--}_$run_i"
        done
      done ;;
    engine-seqs)  # GQA alone with more sequences per step (up to 1024; KV pool still capped at
      # 48 GiB), on the fixed 1000 x 256/256 workload and on random lengths (inputs 32-1024,
      # outputs 32-512)
      for seqs in 512 1024; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "bench_engine_seqs$seqs" 300 python \
          experiments/bench_engine.py --model llama3-8b --max-num-seqs "$seqs" --kv-memory-gib 48 \
          --fuse-projections --max-num-batched-tokens 4096 --out "$out/engine_seqs$seqs"
      done
      for seqs in 256 512; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "bench_engine_random_seqs$seqs" 300 python \
          experiments/bench_engine.py --model llama3-8b --max-num-seqs "$seqs" --kv-memory-gib 48 \
          --fuse-projections --max-num-batched-tokens 4096 --input-range 32 1024 \
          --output-range 32 512 --out "$out/engine_random_seqs$seqs"
      done ;;
    engine-512)  # the two 512-sequence runs alone (fixed 1000 x 256/256 and random lengths)
      for w in fixed random; do
        r=(); [ "$w" = random ] && r=(--input-range 32 1024 --output-range 32 512)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "bench_engine_${w}_seqs512" 300 python \
          experiments/bench_engine.py "${ENGINE512[@]}" "${r[@]}" \
          --out "$out/engine_${w}_seqs512"
      done ;;
    profile-kv-write-kernel)  # the fixed workload's mean mixed step (4096 tokens) and its
      # 482-sequence decode step with the K/V written by XLA's scatter and by
      # pallas_kernels.kv_write: step time, per-op trace and the compiled HLO (step_hlo.txt)
      for v in scatter kernel; do
        b=()
        [ "$v" = kernel ] && b=(--kv-write-kernel)
        run "profile_decode_kv_$v" 200 python experiments/profile_decode.py --quick \
          --fuse-projections --batch 482 ${b[@]+"${b[@]}"} \
          --out "$out/profile_kv_write_kernel/decode_$v"
        run "profile_mixed_kv_$v" 240 python experiments/profile_mixed.py --fuse-projections \
          --prompts 14 --prompt-len 256 --decodes 370 --context 257 512 --tokens 4096 \
          ${b[@]+"${b[@]}"} --out "$out/profile_kv_write_kernel/mixed_$v"
      done ;;
    rope-kv-write)  # pallas_kernels.rope_kv_write compiled (its tests), then the 482-sequence
      # decode step and the fixed workload's mean mixed step with the rotations and K/V
      # writes as XLA ops (the default) and as the one kernel (EngineConfig.rope_kv_write), in
      # turns, twice each: step time, per-op trace, compiled HLO
      JAX_DEFAULT_MATMUL_PRECISION=highest run rope_kv_write_tests 120 python -m pytest -q \
        -p no:cacheprovider tests/test_rope_kv_write.py
      for i in 1 2; do
        for v in xla kernel; do
          b=()
          [ "$v" = kernel ] && b=(--rope-kv-write)
          run "profile_decode_rope_${v}_$i" 150 python experiments/profile_decode.py --quick \
            --fuse-projections --batch 482 ${b[@]+"${b[@]}"} \
            --out "$out/rope_kv_write/decode_${v}_$i"
        done
      done
      for v in xla kernel; do
        b=()
        [ "$v" = kernel ] && b=(--rope-kv-write)
        run "profile_mixed_rope_$v" 180 python experiments/profile_mixed.py --fuse-projections \
          --prompts 14 --prompt-len 256 --decodes 370 --context 257 512 --tokens 4096 \
          ${b[@]+"${b[@]}"} --out "$out/rope_kv_write/mixed_$v"
      done ;;
    add-norm-kernel)  # pallas_kernels.add_rms_norm and rope_kv_write compiled (their tests);
      # the 482-sequence decode step and the fixed workload's mean mixed step with XLA's adds
      # and norms and with the kernel (EngineConfig.add_norm_kernel); then the 1000 x 256/256
      # run at 512 sequences with gate/up and q/k/v stored [D_out, D_in] (nk) alone, with the
      # add-norm kernel (an) and with it and rope_kv_write (anr), in turns, twice
      JAX_DEFAULT_MATMUL_PRECISION=highest run add_norm_tests 150 python -m pytest -q \
        -p no:cacheprovider tests/test_add_rms_norm.py tests/test_rope_kv_write.py
      for v in xla kernel; do
        b=()
        [ "$v" = kernel ] && b=(--add-norm-kernel)
        run "profile_decode_norm_$v" 150 python experiments/profile_decode.py --quick \
          --fuse-projections --batch 482 ${b[@]+"${b[@]}"} --out "$out/add_norm/decode_$v"
        run "profile_mixed_norm_$v" 180 python experiments/profile_mixed.py --fuse-projections \
          --prompts 14 --prompt-len 256 --decodes 370 --context 257 512 --tokens 4096 \
          ${b[@]+"${b[@]}"} --out "$out/add_norm/mixed_$v"
      done
      nk="--output-major gate_up_proj,qkv_proj"
      engine_turns engine 2 "an=$nk --add-norm-kernel" "nk=$nk" \
        "anr=$nk --add-norm-kernel --rope-kv-write" ;;
    engine-fast-options)  # the fixed (1000 x 256/256) and random-length workloads at 512
      # sequences with the engine's defaults and with gate/up and q/k/v stored [D_out, D_in]
      # plus the add-norm and RoPE/K-V-write kernels (the fastest setting of ce1ed36), in
      # turns, twice: whether those options should become the defaults
      fast="--output-major gate_up_proj,qkv_proj --add-norm-kernel --rope-kv-write"
      random="--input-range 32 1024 --output-range 32 512"
      engine_turns engine 2 "fixed_default=" "fixed_fast=$fast" "random_default=$random" \
        "random_fast=$random $fast" ;;
    engine-defaults-ab)  # the fixed (1000 x 256/256) and random-length workloads at 512
      # sequences: an older tree (OPTGQA_OLD_TREE) with its defaults, this tree with its
      # defaults, and this tree with gate/up and q/k/v stored [D_out, D_in] plus the add-norm
      # and RoPE/K-V-write kernels, in turns, twice (OPTGQA_ROUNDS picks rounds)
      fast="--output-major gate_up_proj,qkv_proj --add-norm-kernel --rope-kv-write"
      random="--input-range 32 1024 --output-range 32 512"
      engine_turns engine 2 "fixed_old=" "fixed_default=" "fixed_fast=$fast" \
        "random_old=$random" "random_default=$random" "random_fast=$random $fast" ;;
    flash-triton-peer)  # causal flash attention at B=4 T=4096 GQA 32/8 and MHA: a native
      # Triton kernel (experiments/flash_triton_kernel.py; plain loads, TMA descriptors, warp
      # specialization) against cuDNN (JAX's and PyTorch's), PyTorch's flash backend and
      # pallas_kernels.flash_attention, in interleaved rounds: how close Triton gets to cuDNN
      run flash_triton_peer 300 python experiments/flash_triton_peer.py --rounds 3 \
        --out "$out" ;;
    engine-small-op-defaults)  # the fixed (1000 x 256/256) and random-length workloads at
      # 512 sequences: the defaults, the add-norm and RoPE/K-V-write kernels (anr: no memory
      # cost, the candidates for defaults), and those with gate/up and q/k/v stored
      # [D_out, D_in] (fast), in turns, twice (OPTGQA_ROUNDS picks rounds)
      anr="--add-norm-kernel --rope-kv-write"
      fast="--output-major gate_up_proj,qkv_proj $anr"
      random="--input-range 32 1024 --output-range 32 512"
      engine_turns engine 2 "fixed_default=" "fixed_anr=$anr" "fixed_fast=$fast" \
        "random_default=$random" "random_anr=$random $anr" "random_fast=$random $fast" ;;
    engine-batch1-small-ops)  # batch-1 decode (one 256-token prompt, 256 tokens out) in
      # bfloat16 and W4 g128 with the add-norm and RoPE/K-V-write kernels on (the defaults
      # with one device since b8f4dc1) and off, in turns
      b1=(--model llama3-8b --num-requests 1 --max-num-seqs 1 --seq-buckets 1
          --max-num-batched-tokens 256 --token-buckets 256 --kv-memory-gib 48 --fuse-projections)
      for fmt in bf16 w4g128; do
        q=(); [ "$fmt" = bf16 ] || q=(--quantize "$fmt")
        for ops in on off; do
          k=(); [ "$ops" = on ] || k=(--no-add-norm-kernel --no-rope-kv-write)
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "batch1_${fmt}_ops_$ops" 200 python \
            experiments/bench_engine.py "${b1[@]}" ${q[@]+"${q[@]}"} ${k[@]+"${k[@]}"} \
            --out "$out/batch1_${fmt}_ops_$ops"
        done
      done ;;
    engine-rope-kv-write)  # the 1000 x 256/256 run at 512 sequences with the rotations and
      # K/V writes as XLA ops and as pallas_kernels.rope_kv_write, in turns, twice
      engine_turns engine_rope 2 "xla=" "kernel=--rope-kv-write" ;;
    profile-mixed)  # one mixed (prefill) step as the engine benchmarks run them at 512
      # sequences (experiments/schedule_replay.py: the fixed workload's mean mixed step is ~14
      # prompts of 256 + ~370 decodes; the random one's ~3 prompt chunks of ~550 + ~450
      # decodes with contexts up to 1536), with its per-op trace and the run's bf16 GEMM rate
      run profile_mixed_fixed 240 python experiments/profile_mixed.py --fuse-projections \
        --prompts 14 --prompt-len 256 --decodes 370 --context 257 512 --tokens 4096 \
        --out "$out/profile_mixed_fixed"
      run profile_mixed_random 240 python experiments/profile_mixed.py --fuse-projections \
        --prompts 3 --prompt-len 553 --decodes 453 --context 32 1536 --tokens 4096 \
        --out "$out/profile_mixed_random" ;;
    engine-buckets)  # the random-length workload at 512 sequences with token buckets every 512
      # (schedule_replay.py: its mixed steps' padding 19% -> 8%)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_engine_random_buckets512 300 python \
        experiments/bench_engine.py "${ENGINE512[@]}" --input-range 32 1024 \
        --output-range 32 512 --token-buckets 512,1024,1536,2048,2560,3072,3584,4096 \
        --out "$out/engine_random_buckets512" ;;
    grouping)  # the grouping ablation on the RoPE reference model and SmolLM2 (needs reference)
      run ablate_grouping 600 python experiments/ablate_grouping.py --pallas-check "${tokens[@]}" \
        --reference checkpoints/reference/rope --out "$out/grouping" ;;
    mfu)  # training MFU of larger models of the reference's shape family (60 steps each)
      for dims in "768 12 12 2048" "1024 8 16 2816" "1536 8 24 4096"; do
        set -- $dims
        run "mfu_d$1" 300 python experiments/train_reference.py --positions rope --steps 60 "${tokens[@]}" \
          --warmup-steps 6 --eval-every 0 --max-eval-windows 32 --d-model "$1" --n-layers "$2" \
          --n-heads "$3" --ffn-dim "$4" --out "$out/mfu/d$1" --checkpoints "checkpoints/mfu/d$1"
      done ;;
    variants-one-row)  # the one-row quantized matmul variants alone (one K step per program,
      # runtime_magic, half_pairs) on the four Llama-3-8B shapes
      run compare_variants_one_row 400 python experiments/compare_variants.py --parts quant \
        --rows 1 --out "$out/variants_one_row" ;;
    variants-256-occupancy)  # the quantized products at 256 rows: the 128 x 128 dequant_tiles
      # tiles (one block per SM) against 64-row tiles that fit 2-4 blocks per SM
      # (experiments/quant_occupancy_sass.py), the streaming dequantize + bfloat16 route and
      # bfloat16
      occ=()
      for v in "joined dequant_tiles" "joined dequant_tiles 64x128 w4 s3" \
          "joined dequant_tiles 64x128 w4 s2" "joined dequant_tiles 64x128 w8 s3" \
          "joined dequant_tiles 64x64 w4 s3" "joined dequant_tiles 64x64 w4 s2" \
          "dequantize kernel" default; do occ+=(--variant "$v"); done
      run compare_variants_256_occupancy 560 python experiments/compare_variants.py \
        --parts quant --rows 256 "${occ[@]}" --out "$out/variants_256_occupancy" ;;
    variants-256)  # the quantized products at 256 and 512 rows (the engine's decode buckets
      # of the throughput workload): whole 256-row dequant_tiles tiles against the 128-row
      # ones, the streaming dequantize + bfloat16 route that quant.matmul takes there, and
      # bfloat16
      run compare_variants_256 560 python experiments/compare_variants.py --parts quant \
        --rows 256,512 --out "$out/variants_256" ;;
    quant-tune-256)  # the tile search at 256 and 512 rows (the four shapes, W4 g128), timing the
      # dequantize route too; tiles that beat it are written to OPTGQA_QUANT_TABLE (default
      # OUT/quant/quant_matmul.json), which quant.matmul then takes above 64 rows (pass the
      # file as OPTGQA_TUNING to the engine run that follows)
      run tune_quant_256 560 python experiments/tune_quant.py --rows 256,512 --formats w4g128 \
        --case-budget-s 60 --budget-s 540 --confirm-rounds 3 \
        --table "${OPTGQA_QUANT_TABLE:-$out/quant/quant_matmul.json}" --out "$out/quant_tune_256" ;;
    variants-decode)  # decode: ALiBi under the plain default's config, the tile sweep
      run compare_variants_decode 400 python experiments/compare_variants.py \
        --parts decode,decode_tiles --out "$out/variants_decode" ;;
    quant-engine-batch1)  # the engine's batch-1 decode with its default options (command
      # buffers on for steps of <= 32 tokens): bfloat16, W4 g128, W4 g128 with the LM head and
      # token table quantized too
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_quant_engine_batch1 600 python \
        experiments/bench_quant.py --only engine --engine-formats bf16,w4g128,w4g128+head+emb \
        --engine-workloads batch1 --out "$out/quant_engine_batch1" ;;
    batch1-stacked)  # the engine's batch-1 decode with EngineConfig.stack_layers off and on
      # (one argument buffer per weight kind for all layers): bfloat16, W4 g128 and W4 g128
      # with the LM head and token table quantized
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_quant_batch1_stacked 560 python \
        experiments/bench_quant.py --only engine --engine-formats bf16,w4g128,w4g128+head+emb \
        --engine-workloads batch1 --stack-layers both --out "$out/batch1_stacked" ;;
    batch1-stacked-gqsa)  # W4S50 packed with shift-major codes, stacking off, on, off again;
      # then one traced step of W4 g128 stacked, with the host's dispatch time
      for run_s in 1_off 2_on 3_off; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "gqsa_batch1_stacked_$run_s" 200 python \
          experiments/gqsa_eval.py --part engine --engine-formats w4g128s50pksm --sequences 1 \
          --stack-layers "${run_s#*_}" --out "$out/batch1_stacked/gqsa_pksm_$run_s"
      done
      run profile_batch1_stacked 150 python experiments/profile_decode.py --quick \
        --fuse-projections --batch 1 --context 257 512 --quantize w4g128 --stack-layers \
        --xla-option xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL \
        --xla-option xla_gpu_ftz=true --out "$out/batch1_stacked/profile_w4g128_stacked" ;;
    quant-engine-throughput)  # the 1000 x 256/256 workload, bfloat16 against W4 g128
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_quant_engine_throughput 600 python \
        experiments/bench_quant.py --only engine --engine-formats bf16,w4g128 \
        --engine-workloads throughput --out "$out/quant_engine_throughput" ;;
    variants)  # the kernel variants built without a GPU against the defaults (quant joined
      # tiles and dequant_tiles, flash lazy_rescale, decode masked query rows)
      run compare_variants 600 python experiments/compare_variants.py --out "$out/variants" ;;
    quant-diagnose)  # timed call against device trace (timing_gaps), and the ladder with
      # each rung's kernel time (instruction counts need no GPU: experiments/ptx_table.py)
      run timing_gaps 240 python experiments/timing_gaps.py --out "$out/quant" --label plain
      run profile_quant 300 python experiments/profile_quant.py --shapes gate_up,down \
        --rows 1,16 --out "$out/quant" ;;
    sharding-8b)  # two GPUs: the 8B shape at TP 1 and 2 (batch-1 decode, 1000 x 256/256)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_sharding 600 python \
        experiments/bench_sharding.py --out "$out/sharding" --resume \
        --parts 8b-b1-tp1,8b-b1-tp2,8b-tp1,8b-tp2 --timeout-s 280 ;;
    sharding-70b)  # two GPUs: the 70B shape at TP 2 (throughput with MBU, batch-1 decode)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_sharding_70b 600 python \
        experiments/bench_sharding.py --out "$out/sharding" --resume \
        --parts 70b-tp2,70b-b1-tp2 --timeout-s 560 ;;
    quant-tune)  # the tile search behind QuantMatmulConfig.for_shape
      run tune_quant 600 python experiments/tune_quant.py --out "$out/quant" ;;
    quant-profile)  # the quantized matmul's time split by a ladder of stripped kernels, and
      # the instruction mix of each rung's loops in the PTX that XLA compiled
      dump=$(mktemp -d)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$dump" run profile_quant 300 python \
        experiments/profile_quant.py --out "$out/quant"
      run ptx_mix 120 python experiments/ptx_mix.py "$dump" --kernel quant \
        --json "$out/quant/ptx_mix.json"
      rm -rf "$dump" ;;
    quant-profile-16)  # the same ladder at 16 rows on gate/up and down with the tuning
      # table's tiles (shift-by-shift tensor-core path): what the 16-row kernel is bound by
      run profile_quant_16 300 python experiments/profile_quant.py --rows 16 \
        --shapes gate_up,down --out "$out/quant_profile16" ;;
    quant-wl-probe)  # the weights-left W4 kernel (pallas_kernels.quant_matmul_wl) against
      # bfloat16 and quant.matmul's route at 16, 1, 64 and 256 rows, a small grid of its tiles
      run quant_wl_probe "${OPTGQA_WL_LIMIT_S:-420}" python experiments/quant_wl_probe.py \
        --rows "${OPTGQA_WL_ROWS:-16,1,64,256}" --budget-s "${OPTGQA_WL_BUDGET_S:-380}" \
        --shapes "${OPTGQA_WL_SHAPES:-gate_up,down,qkv,o}" ${OPTGQA_WL_QUICK:+--quick} \
        --out "$out/quant_wl" ;;
    quant-sweep)  # how fast each tile setting streams the codes, kernel layout and tile-contiguous
      run profile_quant_sweep 400 python experiments/profile_quant.py --sweep-load \
        --shapes gate_up,o --out "$out/quant" ;;
    quant-tune-decode)  # the tile search at 1, 16 and 64 rows (W4 g128, the four shapes); the
      # cases whose best tiles beat the rules go into the tuning table OPTGQA_TUNE_TABLE
      # (default OUT/quant/quant_matmul.json; pallas_kernels/tuning/quant_matmul.json is the
      # packaged one, read by QuantMatmulConfig.for_shape on the same device kind)
      run tune_quant_decode 600 python experiments/tune_quant.py --rows "${OPTGQA_TUNE_ROWS:-1,16,64}" \
        --formats w4g128 --budget-s 540 --case-budget-s "${OPTGQA_TUNE_CASE_S:-35}" --confirm-rounds 3 \
        --table "${OPTGQA_TUNE_TABLE:-$out/quant/quant_matmul.json}" --out "$out/quant" ;;
    quant-descend-decode)  # from this device's tuning-table tiles (and the rules'), a descent
      # to faster neighbours at 1 and 16 rows (W4 g128, the four shapes; tune_quant --descend);
      # the cases that beat the rules go into OPTGQA_TUNE_TABLE (default OUT/quant/quant_matmul.json)
      run tune_quant_descend 600 python experiments/tune_quant.py --descend \
        --rows "${OPTGQA_TUNE_ROWS:-1,16}" --formats w4g128 --budget-s 500 \
        --case-budget-s "${OPTGQA_TUNE_CASE_S:-50}" --confirm-rounds 3 \
        --table "${OPTGQA_TUNE_TABLE:-$out/quant/quant_matmul.json}" --out "$out/quant" ;;
    quant-batch1-wrapperless)  # engine batch-1 decode, W4 g128 on the packaged table against
      # the same tiles reading x as given with x's sums taken in the kernel (raw_x, kernel_sums,
      # runtime_magic: one launch per one-row product besides the split sum, instead of three;
      # results/h100/quant/tables_wrapperless, written by experiments/table_variant.py), in
      # turns, twice; bfloat16 once
      alt=${OPTGQA_VARIANT_TABLE:-$PWD/experiments/results/h100/quant/tables_wrapperless}
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run batch1_wrapperless_bf16 200 python \
        experiments/bench_quant.py --only engine --engine-formats bf16 --engine-workloads batch1 \
        --out "$out/batch1_wrapperless/bf16"
      for i in 1 2; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "batch1_wrapperless_packaged_$i" 200 python \
          experiments/bench_quant.py --only engine --engine-formats w4g128 \
          --engine-workloads batch1 --out "$out/batch1_wrapperless/packaged_$i"
        OPTGQA_TUNING=$alt XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run \
          "batch1_wrapperless_variant_$i" 200 python experiments/bench_quant.py --only engine \
          --engine-formats w4g128 --engine-workloads batch1 --out "$out/batch1_wrapperless/variant_$i"
      done ;;
    quant-kernels-decode)  # W4 g128 against bfloat16 and XLA at 1, 16, 64 and 256 rows, with
      # the tiles quant_matmul takes on this device (tuning table where it has an entry)
      run bench_quant_kernels_decode 600 python experiments/bench_quant.py --only kernels \
        --formats w4g128 --rows 1,16,64,256 --out "$out/quant_decode" ;;
    quant-kernels)  # quantized matmul against bfloat16 and XLA
      run bench_quant_kernels 600 python experiments/bench_quant.py --only kernels \
        --out "$out/quant" ;;
    quant-engine)  # the engine on the Llama-3-8B shape: bfloat16, W4 g128, W8
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run bench_quant_engine 600 python \
        experiments/bench_quant.py --only engine --out "$out/quant_engine" ;;
    row-block-speed)  # W4S50 with masks shared by blocks of 16, 32 and 64 output features
      # (pallas_kernels.row_block_quant_matmul) against dense W4 g128 and bfloat16 at one row:
      # a small tile search, then the best and dense W4 in interleaved rounds
      JAX_DEFAULT_MATMUL_PRECISION=highest run row_block_tests 150 python -m pytest -q \
        -p no:cacheprovider tests/test_row_block_quant_matmul.py
      run row_block_speed 300 python experiments/row_block_speed.py --rows 1 \
        --blocks 16,32,64 --rounds 3 --out "$out/row_block" ;;
    gqsa-speed)  # BSR W4S30/S50 against dense W4/W2 and bfloat16, per layer
      run gqsa_speed 600 python experiments/gqsa_eval.py --part speed --out "$out/gqsa" ;;
    gqsa-tune)  # W4S50 per layer at 1 and 16 rows: the BSR tile search at one row (whole-row
      # programs against the block list), written to the tuning table OPTGQA_BSR_TABLE
      # (default OUT/gqsa/bsr_quant_matmul.json), and the repacked dense route at 16 rows
      run gqsa_tune 400 python experiments/gqsa_eval.py --part speed --rows 1,16 \
        --sparsities 0.5 --no-group-major --confirm-rounds 3 \
        --table "${OPTGQA_BSR_TABLE:-$out/gqsa/bsr_quant_matmul.json}" --out "$out/gqsa_tune" ;;
    gqsa-tune-packed)  # one row only: the BSR tile search, then the packed layout's own
      # (gqsa_speed.packed_row), with interleaved confirmation; winners into the tables
      run gqsa_tune_packed 560 python experiments/gqsa_eval.py --part speed --rows 1 \
        --sparsities 0.5 --no-group-major --confirm-rounds 3 \
        --table "${OPTGQA_BSR_TABLE:-$out/gqsa/bsr_quant_matmul.json}" --out "$out/gqsa_tune_packed" ;;
    dispatch-cost)  # the host's launch time of one jitted program against its number of
      # argument buffers (a batch-1 decode step takes 517-645)
      run dispatch_cost 150 python experiments/dispatch_cost.py --counts 8,64,256,512,768,1024 \
        --out "$out/batch1" ;;
    gqsa-engine-packed)  # batch-1 decode: dense W4, W4S50 with each layer's arrays packed
      # into one (w4g128s50pk: 256 fewer argument buffers per step), the same with shift-major
      # codes (w4g128s50pksm: x read as given, no wrapper op per product; pksmf: x handed to
      # the kernel in float32, the casts fused into the neighbouring ops) and W4S50 as four
      # arrays, two rounds in opposite orders (runs on one machine have differed by 10-40%);
      # then one traced step of each with command buffers on, with the host threads' events
      for round in 1 2; do
        fmts=w4g128,w4g128s50pk,w4g128s50pksm,w4g128s50pksmf,w4g128s50
        [ "$round" = 2 ] && fmts=w4g128s50,w4g128s50pksmf,w4g128s50pksm,w4g128s50pk,w4g128
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "gqsa_engine_packed_$round" 400 python \
          experiments/gqsa_eval.py --part engine --engine-formats "$fmts" --sequences 1 \
          --out "$out/gqsa_engine_packed_$round"
      done
      for fmt in w4g128 w4g128s50pk w4g128s50pksm w4g128s50pksmf w4g128s50; do
        run "profile_batch1_host_$fmt" 150 python experiments/profile_decode.py --quick \
          --fuse-projections --batch 1 --context 257 512 --quantize "$fmt" \
          --xla-option xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL \
          --xla-option xla_gpu_ftz=true --out "$out/profile_batch1_host_$fmt"
      done ;;
    product-probe)  # the layer's bfloat16 products at 482 and 4096 rows by weight layout, with
      # the GEMM kernel each ran (the o projection ran at ~470 TFLOP/s in the engine's steps)
      # (kn also compiled with xla_gpu_triton_gemm_any: XLA's autotuner may then
      # take a Triton GEMM over cuBLAS for a plain dot)
      run product_probe 500 python experiments/product_probe.py \
        --xla-option xla_gpu_triton_gemm_any=true --out "$out/product_probe" ;;
    prefill-tiles)  # the ragged prefill kernel on the fixed workload's mean mixed step (14
      # prompts of 256 beside 370 skipped decode rows, 512 sequences, 4096 rows): the default,
      # an older tree's kernel (OPTGQA_OLD_TREE: a checkout's root), the prompts alone, cuDNN on
      # them, and a sweep of tiles with and without group_heads
      old=(${OPTGQA_OLD_TREE:+--old-tree "$OPTGQA_OLD_TREE"})
      run prefill_tiles 420 python experiments/prefill_tiles.py --quick "${old[@]}" \
        --out "$out/prefill_tiles" ;;
    engine-ab)  # the 1000 x 256/256 run at 512 sequences, an older tree (OPTGQA_OLD_TREE, run
      # from its root) and this one taking turns, twice; this tree with its default sequence
      # buckets, then with the old ones (64, 256, 512)
      engine=("${ENGINE512[@]}")
      abs=$(cd "$out" && pwd)
      for i in 1 2; do
        if [ -n "${OPTGQA_OLD_TREE:-}" ]; then
          (cd "$OPTGQA_OLD_TREE" && out=$abs && OPTGQA_COMMIT=${OPTGQA_OLD_COMMIT:-older-tree} \
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run \
            "engine_ab_old_$i" 240 python experiments/bench_engine.py "${engine[@]}" \
            --out "$abs/engine_ab_old_$i")
        fi
        b=(); [ "$i" = 2 ] && b=(--seq-buckets 64,256,512)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "engine_ab_new_$i" 240 python \
          experiments/bench_engine.py "${engine[@]}" "${b[@]}" --out "$out/engine_ab_new_$i"
      done ;;
    engine-random-ab)  # the random-length run at 512 sequences (inputs 32-1024, outputs
      # 32-512), an older tree (OPTGQA_OLD_TREE, run from its root) and then this one
      engine=("${ENGINE512[@]}" --input-range 32 1024 --output-range 32 512)
      abs=$(cd "$out" && pwd)
      if [ -n "${OPTGQA_OLD_TREE:-}" ]; then
        (cd "$OPTGQA_OLD_TREE" && out=$abs && OPTGQA_COMMIT=${OPTGQA_OLD_COMMIT:-older-tree} \
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run \
          engine_random_old 200 python experiments/bench_engine.py "${engine[@]}" \
          --out "$abs/engine_random_old")
      fi
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run engine_random_new 200 python \
        experiments/bench_engine.py "${engine[@]}" --out "$out/engine_random_new" ;;
    engine-token-budget)  # the 1000 x 256/256 run at 512 sequences with 4096-token steps (as
      # in every run so far) and with 8192 (half as many mixed steps, each with ~30 prompts
      # beside the decode rows; buckets every 2048 so that a 4096-token step is not padded to
      # 8192), in turns, twice (argparse: the later --max-num-batched-tokens wins)
      for i in 1 2; do
        for t in 4096 8192; do
          b=(--max-num-batched-tokens "$t")
          [ "$t" = 8192 ] && b+=(--token-buckets 1024,2048,4096,6144,8192)
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "engine_tokens${t}_$i" 240 python \
            experiments/bench_engine.py "${ENGINE512[@]}" "${b[@]}" \
            --out "$out/engine_tokens${t}_$i"
        done
      done ;;
    engine-output-major)  # the 1000 x 256/256 run at 512 sequences with every float kernel
      # stored [D_in, D_out] (kn, as in every run so far), with the fused gate/up and q/k/v
      # stored [D_out, D_in] (nk; EngineConfig.output_major) and with the LM head too (nkh),
      # in turns, twice
      engine_turns engine 2 "kn=" "nk=--output-major gate_up_proj,qkv_proj" \
        "nkh=--output-major gate_up_proj,qkv_proj,lm_head" ;;
    engine-output-major-all)  # the 1000 x 256/256 run at 512 sequences with the o and down
      # projections stored [D_out, D_in] as well (nko: gate/up, q/k/v, o; nkod: and down),
      # against gate/up and q/k/v only (nk) and none (kn), in turns, twice
      engine_turns engine 2 "nko=--output-major gate_up_proj,qkv_proj,o_proj" \
        "nkod=--output-major gate_up_proj,qkv_proj,o_proj,down_proj" "kn=" \
        "nk=--output-major gate_up_proj,qkv_proj" ;;
    engine-kv-write-kernel)  # one layer's K/V write alone (XLA's scatter against
      # pallas_kernels.kv_write), then the 1000 x 256/256 run at 512 sequences with the scatter
      # and with the kernel (EngineConfig.kv_write_kernel), in turns, twice
      run kv_write_bench 150 python experiments/kv_write_bench.py \
        --variants unique+sorted,pallas --out "$out/kv_write_kernel"
      engine_turns engine_kv 2 "scatter=" "kernel=--kv-write-kernel" ;;
    engine-page-size)  # the 1000 x 256/256 run at 512 sequences with pages of 16 and of 32
      # tokens, in turns, twice (the decode kernel reads K/V one page of one head at a time:
      # 4 KB at 16 tokens, 8 KB at 32)
      engine=("${ENGINE512[@]}")
      for i in 1 2; do
        for z in 16 32; do
          XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "engine_page${z}_$i" 240 python \
            experiments/bench_engine.py "${engine[@]}" --page-size "$z" \
            --out "$out/engine_page${z}_$i"
        done
      done ;;
    step-gemms)  # the products in the engine's steps (results/h100/step_gemms_5b427eb): the
      # o projection alone both ways, then the mixed step and the 1000 x 256/256 run at 512
      # sequences with the model unchanged and with o as a float32-out (Triton) dot
      run o_proj_iso 120 python experiments/o_proj_f32_probe.py iso
      mixed=(--fuse-projections --prompts 14 --prompt-len 256 --decodes 370 --context 257 512
             --tokens 4096)
      engine=("${ENGINE512[@]}")
      for v in unchanged o_f32; do
        p=(); [ "$v" = o_f32 ] && p=(--patch)
        run "mixed_o_$v" 150 python experiments/o_proj_f32_probe.py "${p[@]}" mixed -- \
          "${mixed[@]}" --out "$out/mixed_o_$v"
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run "engine_o_$v" 300 python \
          experiments/o_proj_f32_probe.py "${p[@]}" engine -- "${engine[@]}" \
          --out "$out/engine_o_$v"
      done ;;
    profile-bsr-call)  # one batch-1 product per Llama-3-8B shape, dense W4 against W4S50
      # (four arrays, packed, packed with shift-major codes): per-call time split by a device trace into the main kernel,
      # the wrapper's other ops and the GPU's idle time
      run profile_bsr_call 300 python experiments/profile_bsr_call.py --out "$out/gqsa" ;;
    gqsa-engine-s50)  # engine decode: bfloat16, dense W4 and W4S50 at 1 and 16 sequences
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run gqsa_engine_s50 500 python \
        experiments/gqsa_eval.py --part engine --engine-formats bf16,w4g128,w4g128s50 \
        --sequences 1,16 --out "$out/gqsa_engine_s50" ;;
    gqsa-engine-tables)  # engine batch-1 decode, W4S50 under each BSR tile table in
      # OPTGQA_BSR_TABLES (directories; default the H100 tables of 8035686 and 544c0a0), then
      # dense W4 once: which tile change moves the engine's step
      tables=${OPTGQA_BSR_TABLES:-experiments/results/h100/gqsa/tables_8035686_544c0a0}
      for t in "$tables"/*/; do
        t=${t%/}
        case $t in /*) ;; *) t=$PWD/$t ;; esac
        OPTGQA_TUNING=$t XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run \
          "gqsa_engine_tables_$(basename "$t")" 150 python experiments/gqsa_eval.py --part engine \
          --engine-formats w4g128s50 --sequences 1 --out "$out/gqsa_engine_tables/$(basename "$t")"
      done
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run gqsa_engine_tables_dense_w4 150 python \
        experiments/gqsa_eval.py --part engine --engine-formats w4g128 --sequences 1 \
        --out "$out/gqsa_engine_tables/dense_w4" ;;
    gqsa-engine-gathered)  # engine decode at 16 sequences, W4S50 with its 2-64-row products on
      # the block-map kernel (OPTGQA_BSR_BATCHED=gathered, now the default; at 7364f16 and before,
      # the repacked layer)
      OPTGQA_BSR_BATCHED=gathered XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run gqsa_engine_gathered \
        300 python experiments/gqsa_eval.py --part engine --engine-formats w4g128s50 \
        --sequences 16 --out "$out/gqsa_engine_gathered" ;;
    gqsa-engine)  # engine decode with BSR weights (1 and 16 sequences)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 run gqsa_engine 600 python experiments/gqsa_eval.py \
        --part engine --resume --out "$out/gqsa" ;;
    gqsa-accuracy)  # SmolLM2 held-out perplexity: W4, W4S30/S50, W2, 2:4, with calibration
      run gqsa_accuracy 3600 python experiments/gqsa_eval.py --part accuracy --resume \
        --out "$out/gqsa" ;;
    gqsa-reference)  # the same study on the RoPE reference model (trained first when
      # checkpoints/reference/rope is absent; needs OPTGQA_TOKENS where SmolLM2 is not installed)
      [ -d checkpoints/reference/rope ] || run train_reference_rope 300 python \
        experiments/train_reference.py --positions rope "${tokens[@]}" --out "$out/reference"
      # the retrained model differs in its last bits from one machine to the next, so the
      # study runs on one machine: 64 calibration windows, 50 steps a stage, rows by interest
      run gqsa_reference 3600 python experiments/gqsa_eval.py --part accuracy --resume \
        --model checkpoints/reference/rope "${tokens[@]}" --group-size 128 --nsamples 64 \
        --bqpo-steps 50 --e2e-steps 50 --runs float,w4,w4s50,w4s50+both,w4s30,w4s30+both,2:4,w4+2:4,w4+2:4+both,w2g128,w2g128+both,w4+both,w4s50+bqpo,w4s50+e2e,w2g64,w2g64+both \
        --out "$out/gqsa_reference" ;;
    *) echo "unknown step $step (tests variants kernels profile engine engine-sync engine-graphs" \
            "engine-seqs engine-512 gqsa-reference decode-alibi decode-alibi-ab group-tiles kv-write profile-kv-writes engine-kv-writes batch1-stacked batch1-stacked-gqsa decode-short-tables engine-context-buckets flash-mqa profile-decode512 product-probe step-gemms variants-256 quant-tune-256 variants-one-row variants-decode quant-engine-batch1 profile-batch1 profile-batch1-sparse batch1-graphs" \
            "reference grouping mfu quant-diagnose quant-tune quant-tune-decode quant-profile quant-sweep" \
            "quant-kernels quant-kernels-decode quant-engine-throughput" \
            "quant-engine gqsa-speed gqsa-tune gqsa-engine gqsa-engine-s50 gqsa-accuracy profile-bsr-call gqsa-tune-packed" \
            "sharding-8b sharding-70b)"; exit 2 ;;
  esac
done
