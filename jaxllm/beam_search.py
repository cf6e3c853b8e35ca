"""Beam search on top of the engine, as vLLM's `LLM.beam_search`.

Each step runs every live beam as a one-token request asking for 2 * beam_width logprobs; each beam's
candidates are its tokens + one of those, scored by cumulative (raw) logprob. Candidates ending in EOS
are set aside as completed; of the rest, the beam_width best per prompt live on. At the end, completed
and live beams are ranked by cum_logprob / len(tokens) ** length_penalty (len counts the prompt, and
not a final EOS) and the best beam_width are returned.

KV sharing: beams of one prompt share every full block of their common prefix through the prefix
cache (a beam's request finds its parent's blocks by hash and takes a reference), so each step
computes only the tokens of a beam's last, partial block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxllm.outputs import Logprob
from jaxllm.sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` include the prompt; `text` is filled when the beam is returned."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first (at most beam_width of them)."""

    sequences: list[BeamSearchSequence]


def get_beam_search_score(tokens: list[int], cum_logprob: float, eos_token_id: int | None,
                          length_penalty: float = 1.0) -> float:
    """cum_logprob / seq_len ** length_penalty, where seq_len leaves out a final EOS (as vLLM and HF)."""
    seq_len = len(tokens)
    if tokens[-1] == eos_token_id:
        seq_len -= 1
    return cum_logprob / (seq_len ** length_penalty)


def beam_search(llm, prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
    engine = llm.llm_engine
    tokenizer = engine.tokenizer
    eos = tokenizer.eos_token_id
    width = params.beam_width
    sampling = SamplingParams(logprobs=2 * width, max_tokens=1, temperature=params.temperature)

    def score(beam: BeamSearchSequence) -> float:
        return get_beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)

    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    live: list[list[BeamSearchSequence]] = []
    for i, prompt in enumerate(prompts):
        try:  # tokenize and validate as generate() does
            req = engine.make_request(f"beam-check-{i}", prompt, sampling)
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompts[{i}]: {e}") from None
        live.append([BeamSearchSequence(tokens=list(req.prompt_token_ids))])
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompts]

    for _ in range(params.max_tokens):
        beams = [(p, beam) for p, group in enumerate(live) for beam in group]
        if not beams:
            break
        outputs = llm.generate([{"prompt_token_ids": beam.tokens} for _, beam in beams], sampling, use_tqdm=False)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (p, beam), out in zip(beams, outputs):
            position = out.outputs[0].logprobs[0]
            for token_id, lp in position.items():
                new = BeamSearchSequence(tokens=beam.tokens + [token_id], logprobs=beam.logprobs + [position],
                                         cum_logprob=beam.cum_logprob + lp.logprob)
                if token_id == eos and not params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", None
                    completed[p].append(new)
                else:
                    candidates[p].append(new)
        live = [sorted(c, key=score, reverse=True)[:width] for c in candidates]

    results = []
    for p in range(len(prompts)):
        for beam in live[p]:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(completed[p] + live[p], key=score, reverse=True)[:width]
        for beam in best:
            # The text covers the prompt too, as vLLM's offline beam search; a final EOS is left out
            # unless include_stop_str_in_output.
            ends_eos = beam.finish_reason == "stop" and not params.include_stop_str_in_output
            beam.text = tokenizer.decode(beam.tokens[:-1] if ends_eos else beam.tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results
