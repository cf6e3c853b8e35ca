"""Where a step's device time goes: a jax.profiler (CUPTI) trace of a few steps, grouped by kernel.

    python benchmarks/profile_step.py decode --model-shape llama3-8b --out /tmp/profile
    python benchmarks/profile_step.py summarize /tmp/profile/decode-llama3-8b/.../*.xplane.pb

`decode` runs the roofline's decode step (batch B, context L, greedy argmax); `engine` runs the
nano-vllm workload through the real engine (scheduler, sampler, async launch) and profiles a few steps
once the batch is full; it builds the engine as throughput.py does, and takes throughput.py's engine flags
after its own (`--kv-cache-dtype fp8`, `--shape-overrides '{"num_layers": 2}'`, `--max-num-seqs 64`;
`--structured-outputs json --tokenizer FOLDER` profiles the JSON-constrained workload). The
summary lists, for each line of the GPU plane (each stream, and XLA's op and module lines), every name with
its count, total time and share. Nsight Compute was tried first: under
it the JAX process crashed or hung on the lent H200.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class ProfilerRange:
    """jax.profiler (CUPTI) trace of the steps run inside it, summarised per device line on exit:
    for each kernel (or XLA op) name, the count, the total time and its share."""

    def __init__(self, out_dir: str, label: str, top: int = 40):
        self.dir, self.top = os.path.join(out_dir, label), top

    def __enter__(self):
        import jax

        os.makedirs(self.dir, exist_ok=True)
        jax.profiler.start_trace(self.dir)

    def __exit__(self, *exc):
        import jax

        jax.profiler.stop_trace()
        traces = sorted(glob.glob(os.path.join(self.dir, "**", "*.xplane.pb"), recursive=True))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb trace under {self.dir}")
        summarize(traces[-1], self.top)


def profile_decode(args):
    import jax
    import numpy as np

    from jaxllm.models.llama import init_random_weights
    from jaxllm.models.shapes import model_shape_config
    from roofline import decode_inputs, decode_step

    config = model_shape_config(args.model_shape, "bfloat16")
    params = init_random_weights(config, jax.random.PRNGKey(0))
    B, L = args.batch, args.context
    cache, tokens, pos, md = decode_inputs(config, B, L)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        out, cache = decode_step(params, cache, tokens, pos, md, config=config)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    print(f"decode step {args.model_shape} B={B} L={L}: median {1e3 * np.median(times[args.warmup:]):.2f} ms, "
          f"first call (compile) {times[0]:.1f} s")
    with ProfilerRange(args.out, f"decode-{args.model_shape}", args.top):
        for _ in range(args.profiled):
            out, cache = decode_step(params, cache, tokens, pos, md, config=config)
        jax.block_until_ready(out)


def engine_args(args, throughput_flags: list[str]) -> argparse.Namespace:
    """throughput.py's arguments for the engine: its parser's defaults (so a flag it adds has a value here
    too), this run's shape and limits, then any throughput.py flags given after ours."""
    from throughput import arg_parser

    return arg_parser().parse_args(["--model-shape", args.model_shape, "--max-model-len", str(args.max_model_len),
                                    "--max-num-seqs", "256", "--max-num-batched-tokens", "8192", *throughput_flags])


def profile_engine(args, throughput_flags: list[str]):
    import jax

    from jaxllm import SamplingParams, StructuredOutputsParams
    from throughput import SCHEMAS, build_llm, make_workload

    flags = engine_args(args, throughput_flags)
    llm, config = build_llm(flags)
    prompts, output_lens = make_workload(args.num_prompts, args.input_len, args.output_len, config.vocab_size, 0)
    engine = llm.llm_engine
    for i, (p, n) in enumerate(zip(prompts, output_lens)):
        # --structured-outputs json: throughput.py's constrained workload (EOS honoured), as its JSON row.
        so = StructuredOutputsParams(json=SCHEMAS[i % len(SCHEMAS)]) if flags.structured_outputs == "json" else None
        engine.add_request(str(i), {"prompt_token_ids": p},
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=so is None, detokenize=False,
                                          structured_outputs=so))
    prof = ProfilerRange(args.out, f"engine-{args.model_shape}", args.top)
    for step in range(args.start_step + args.profiled):
        if step == args.start_step:
            prof.__enter__()
        engine.step()
    jax.effects_barrier()
    prof.__exit__()
    running = len(engine.scheduler.running)
    print(f"profiled steps {args.start_step}..{args.start_step + args.profiled - 1} with {running} running requests")


def summarize(path: str, top: int = 40) -> None:
    """Group a trace's device events by name, for each line (stream, "XLA Ops", ...) of each GPU plane;
    then, for the busiest line, the idle gaps between its kernels grouped by the kernels around them."""
    from jax.profiler import ProfileData

    planes = [p for p in ProfileData.from_file(path).planes if p.name.startswith("/device:GPU")]
    if not planes:
        print(f"{path}: no GPU plane in this trace (it lists device kernels only)")
    for plane in planes:
        busiest = None
        for line in plane.lines:
            total, count = collections.Counter(), collections.Counter()
            first, last = float("inf"), 0.0
            events = []
            for e in line.events:
                total[e.name[:100]] += e.duration_ns / 1e3
                count[e.name[:100]] += 1
                first, last = min(first, e.start_ns), max(last, e.start_ns + e.duration_ns)
                events.append((e.start_ns, e.start_ns + e.duration_ns, e.name[:60]))
            if not total:
                continue
            busy = sum(total.values())
            if busiest is None or busy > busiest[0]:
                busiest = (busy, line.name, events)
            print(f"== {plane.name} / {line.name}: {sum(count.values())} events, {busy / 1e3:.2f} ms busy "
                  f"over a {(last - first) / 1e6:.2f} ms span")
            print(f"{'total us':>10} {'share':>6} {'count':>6} {'mean us':>8}  name")
            for name, us in total.most_common(top):
                print(f"{us:10.1f} {100 * us / busy:5.1f}% {count[name]:6d} {us / count[name]:8.1f}  {name}")
        if busiest is not None:
            print_gaps(busiest[1], busiest[2], top)
            print_timeline(busiest[1], busiest[2])


def print_gaps(line_name: str, events: list, top: int, min_us: float = 3.0) -> None:
    """Where the device sits idle on one line: gaps longer than `min_us` between consecutive kernels,
    summed by (kernel before, kernel after)."""
    events.sort()
    gaps, count = collections.Counter(), collections.Counter()
    end = None
    for start, stop, name in events:
        if end is not None and (start - end[0]) / 1e3 > min_us:
            key = f"{end[1]} -> {name}"
            gaps[key] += (start - end[0]) / 1e3
            count[key] += 1
        if end is None or stop > end[0]:
            end = (stop, name)
    idle = sum(gaps.values())
    print(f"== idle gaps over {min_us} us on {line_name}: {sum(count.values())} gaps, {idle / 1e3:.2f} ms in all")
    print(f"{'total us':>10} {'count':>6} {'mean us':>8}  kernel before -> kernel after")
    for key, us in gaps.most_common(top):
        print(f"{us:10.1f} {count[key]:6d} {us / count[key]:8.1f}  {key}")


def print_timeline(line_name: str, events: list, anchor: str = "attention", at: float = 0.5) -> None:
    """One period of the trace, kernel by kernel: from the kernel whose name holds `anchor` nearest the
    trace's fraction `at` up to the next such kernel (one layer of the layer loop), with each kernel's
    start, duration and the idle time before it."""
    events = sorted(events)
    marks = [i for i, e in enumerate(events) if anchor in e[2]]
    if len(marks) < 2:
        return
    k = min(range(len(marks) - 1), key=lambda j: abs(marks[j] - at * len(events)))
    first, last = marks[k], marks[k + 1]
    t0 = events[first][0]
    print(f"== one period on {line_name}, from {anchor!r} to the next ({last - first} kernels, "
          f"{(events[last][0] - t0) / 1e3:.1f} us)")
    print(f"{'start us':>9} {'dur us':>7} {'idle us':>7}  name")
    for (start, stop, name), prev in zip(events[first:last + 1], [None] + events[first:last]):
        idle = (start - prev[1]) / 1e3 if prev else 0.0
        print(f"{(start - t0) / 1e3:9.1f} {(stop - start) / 1e3:7.1f} {idle:7.1f}  {name}")


def main(argv=None):
    from throughput import parse_range

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["decode", "engine", "summarize"])
    ap.add_argument("trace", nargs="?", help="summarize: an .xplane.pb file")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/profile"))
    ap.add_argument("--model-shape", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profiled", type=int, default=2)
    ap.add_argument("--start-step", type=int, default=300)
    ap.add_argument("--num-prompts", type=int, default=256, help="engine: the workload (default: nano-vllm's)")
    ap.add_argument("--input-len", type=parse_range, default=(100, 1024))
    ap.add_argument("--output-len", type=parse_range, default=(100, 1024))
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--top", type=int, default=40, help="names listed per device line")
    args, throughput_flags = ap.parse_known_args(argv)
    if throughput_flags and args.mode != "engine":
        ap.error(f"unrecognized arguments: {' '.join(throughput_flags)} (only `engine` takes throughput.py's flags)")
    if args.mode == "summarize":
        if not args.trace or not os.path.isfile(args.trace):
            ap.error(f"summarize needs an existing .xplane.pb file, got {args.trace!r}")
        summarize(args.trace, args.top)
    elif args.mode == "decode":
        profile_decode(args)
    else:
        profile_engine(args, throughput_flags)


if __name__ == "__main__":
    main()
