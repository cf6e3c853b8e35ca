#!/usr/bin/env bash
# Device call, fifth session: the server with the engine stepping on its own thread (this tree) against the
# event loop owning the stepping (base/: `git archive 3d38116 | tar -x -C base`), one after the other in the
# same call, 256 streams at once; then this tree at 10 requests/s. Carry [".whl"] as for gpu_serving.sh.
# Run as `JAXLLM_GIT_COMMIT=<hash> bash benchmarks/device_runs/gpu_serving_ab.sh`. Everything lands in $OUT/all.tgz.
set -u
OUT=${OUT:-/tmp/out}; R=/tmp/res; mkdir -p $OUT $R/main $R/thread
ln -sfn $PWD/.whl base/.whl
echo "### event loop owns the stepping (3d38116)"
(cd base && OUT=$R/main RATES=inf TAG=-loop-stepping JAXLLM_GIT_COMMIT=3d38116 bash benchmarks/device_runs/gpu_serving.sh)
echo "### engine thread (${JAXLLM_GIT_COMMIT:-this tree})"
OUT=$R/thread RATES="inf 10" TAG=-engine-thread bash benchmarks/device_runs/gpu_serving.sh
tar czf $OUT/all.tgz -C $R .
