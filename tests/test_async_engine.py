"""AsyncLLMEngine's streams: a consumer that falls behind reads coalesced cumulative outputs and loses nothing."""

from __future__ import annotations

import asyncio

from jaxllm import SamplingParams
from jaxllm.entrypoints.async_engine import AsyncLLMEngine
from jaxllm.sampling_params import RequestOutputKind


def _stream(engine: AsyncLLMEngine, request, delay: float) -> list:
    async def run():
        engine.start()
        items = []
        try:
            async for _, out in engine.generate([request]):
                items.append([list(o.token_ids) for o in out.outputs])
                await asyncio.sleep(delay)  # a slow client: the engine runs ahead meanwhile
        finally:
            await engine.shutdown()
        return items

    return asyncio.run(run())


def test_a_slow_consumer_reads_the_newest_cumulative_output_and_every_delta(make_llm):
    llm = make_llm()
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    want = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids

    cumulative = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine = AsyncLLMEngine(llm.llm_engine)
    items = _stream(engine, engine.make_request("c", prompt, cumulative), delay=0.3)
    assert items[-1] == [want]
    assert len(items) < len(want)  # several tokens a read: the outputs it fell behind on were coalesced
    assert all(a[0] == b[0][:len(a[0])] and len(a[0]) < len(b[0]) for a, b in zip(items, items[1:]))

    delta = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    engine = AsyncLLMEngine(llm.llm_engine)
    items = _stream(engine, engine.make_request("d", prompt, delta), delay=0.05)
    assert [t for item in items for t in item[0]] == want  # deltas are never dropped
