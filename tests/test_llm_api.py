"""The offline API as a vLLM user calls it: model ids from the local Hugging Face cache, LLM.chat, the model's
generation config as default sampling parameters, final outputs whatever output_kind says,
cumulative_logprob only with logprobs, num_cached_tokens and metrics, and vLLM's constructor names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm import LLM, RequestOutputKind, SamplingParams
from jaxllm.generation_config import default_sampling_params, with_generation_defaults
from jaxllm.loader.model_id import resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, num_gpu_blocks_override=64)
GENERATION_CONFIG = {"temperature": 0.25, "top_k": 7, "top_p": 0.5, "max_new_tokens": 5,
                     "repetition_penalty": 1.1, "do_sample": True, "bos_token_id": 1}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_hf_dir, tmp_path_factory):
    """The tiny model with sampling defaults in its generation_config.json."""
    path = tmp_path_factory.mktemp("tiny-with-generation-config")
    shutil.copytree(tiny_hf_dir, path, dirs_exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), **ENGINE)


# -- model ids ------------------------------------------------------------------------------------
COMMIT_MAIN, COMMIT_V1 = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hf_cache(model_dir, tmp_path_factory):
    """A Hugging Face cache holding `acme/tiny` as the hub lays it out: blobs named by hash,
    snapshots/<commit>/ of links to them, refs/<revision> naming a commit. main and v1 differ in their
    generation config."""
    hub = tmp_path_factory.mktemp("hf-home") / "hub"
    repo = hub / "models--acme--tiny"
    for commit, ref, temperature in ((COMMIT_MAIN, "main", 0.25), (COMMIT_V1, "v1", 0.75)):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in model_dir.iterdir():
            blob = repo / "blobs" / f"{commit[:8]}-{file.name}"
            blob.parent.mkdir(exist_ok=True)
            if file.name == "generation_config.json":
                blob.write_text(json.dumps({**GENERATION_CONFIG, "temperature": temperature}))
            else:
                shutil.copy(file, blob)
            os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return hub


def test_model_id_resolves_from_the_cache(hf_cache):
    snapshots = hf_cache / "models--acme--tiny" / "snapshots"
    assert resolve_model_path("acme/tiny", download_dir=str(hf_cache)) == str(snapshots / COMMIT_MAIN)
    assert resolve_model_path("acme/tiny", "v1", str(hf_cache)) == str(snapshots / COMMIT_V1)
    assert resolve_model_path("acme/tiny", COMMIT_V1, str(hf_cache)) == str(snapshots / COMMIT_V1)
    assert default_sampling_params(resolve_model_path("acme/tiny", "v1", str(hf_cache)))["temperature"] == 0.75


def test_a_missing_model_id_names_the_id_and_the_cache(hf_cache):
    with pytest.raises(FileNotFoundError) as e:
        resolve_model_path("acme/absent", download_dir=str(hf_cache))
    assert "acme/absent" in str(e.value) and str(hf_cache) in str(e.value)
    with pytest.raises(FileNotFoundError, match="revision 'v9'"):
        resolve_model_path("acme/tiny", "v9", str(hf_cache))
    with pytest.raises(ValueError, match="revision"):
        resolve_model_path(str(hf_cache), "v1")  # a local path has no revisions


def test_hf_home_and_hf_hub_cache_are_honoured(hf_cache):
    """The hub's own environment variables, read when huggingface_hub is imported (so: a new process)."""
    code = "from jaxllm.loader.model_id import resolve_model_path; print(resolve_model_path('acme/tiny'))"
    for env in ({"HF_HOME": str(hf_cache.parent)}, {"HF_HUB_CACHE": str(hf_cache)}):
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")} | env
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        assert out.strip() == str(hf_cache / "models--acme--tiny" / "snapshots" / COMMIT_MAIN)


def test_llm_from_a_model_id_equals_llm_from_its_path(hf_cache, llm):
    by_id = LLM("acme/tiny", download_dir=str(hf_cache), revision="main", **ENGINE)
    assert by_id.model == str(hf_cache / "models--acme--tiny" / "snapshots" / COMMIT_MAIN)
    prompts = ["The capital of France is", "Hello"]
    assert ([o.outputs[0].token_ids for o in by_id.generate(prompts, GREEDY, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)])


# -- LLM.chat ---------------------------------------------------------------------------------------
def test_chat_is_generate_on_the_rendered_template(llm):
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    (out,) = llm.chat(CHAT, GREEDY, use_tqdm=False)
    (ref,) = llm.generate(text, GREEDY, use_tqdm=False)
    assert out.prompt == text and out.prompt_token_ids == tok(text, add_special_tokens=False).input_ids
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids and len(ref.outputs[0].token_ids) == 6


def test_chat_batch_and_options(llm):
    second = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}]
    outs = llm.chat([CHAT, second], [GREEDY, GREEDY], use_tqdm=False)
    assert [o.prompt for o in outs] == [llm.chat(c, GREEDY, use_tqdm=False)[0].prompt for c in (CHAT, second)]
    partial = CHAT + [{"role": "assistant", "content": "The answer is"}]
    (cont,) = llm.chat(partial, GREEDY, add_generation_prompt=False, continue_final_message=True, use_tqdm=False)
    assert cont.prompt.endswith("The answer is")
    (plain,) = llm.chat(CHAT, GREEDY, add_generation_prompt=False, use_tqdm=False)
    assert not plain.prompt.endswith("assistant\n") and out_ends_with_generation_prompt(llm)


def out_ends_with_generation_prompt(llm) -> bool:
    return llm.chat(CHAT, GREEDY, use_tqdm=False)[0].prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_inline_file_and_kwargs(llm, tmp_path):
    inline = "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}{{ suffix }}"
    (out,) = llm.chat(CHAT, GREEDY, chat_template=inline, chat_template_kwargs={"suffix": "=>"}, use_tqdm=False)
    assert out.prompt == "[system:Be brief.][user:What is 2 + 2?]=>"
    file = tmp_path / "template.jinja"
    file.write_text(inline)
    (from_file,) = llm.chat(CHAT, GREEDY, chat_template=str(file), use_tqdm=False)
    assert from_file.prompt == "[system:Be brief.][user:What is 2 + 2?]"
    (ref,) = llm.generate(from_file.prompt, GREEDY, use_tqdm=False)
    assert from_file.outputs[0].token_ids == ref.outputs[0].token_ids


def test_chat_refusals(llm):
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(CHAT, GREEDY, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(TypeError, match="tools"):
        llm.chat(CHAT, GREEDY, tools=[{"type": "function"}])
    with pytest.raises(TypeError, match="messages"):
        llm.chat("Hi")
    with pytest.raises(ValueError, match="No such file"):
        llm.chat(CHAT, GREEDY, chat_template="no/such/template.jinja")
    with pytest.raises(ValueError, match="Jinja"):
        llm.chat(CHAT, GREEDY, chat_template="{% for %}")
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(CHAT, GREEDY, chat_template_kwargs={"add_generation_prompt": False})


# -- generation config ----------------------------------------------------------------------------
def test_generation_config_gives_the_defaults(llm, model_dir, tmp_path):
    want = dict(temperature=0.25, top_k=7, top_p=0.5, max_tokens=5, repetition_penalty=1.1)
    defaults = llm.get_default_sampling_params()
    assert {k: getattr(defaults, k) for k in want} == want and defaults.min_p == SamplingParams().min_p
    assert default_sampling_params(str(model_dir), "vllm") == {}
    assert default_sampling_params(None, str(model_dir)) == want  # a folder holding one
    assert default_sampling_params(str(model_dir), "auto", {"temperature": 0.0})["temperature"] == 0.0
    with pytest.raises(FileNotFoundError, match="generation_config"):
        default_sampling_params(str(model_dir), str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="do_sample"):
        default_sampling_params(str(model_dir), "auto", {"do_sample": True})
    # Without SamplingParams, generate() and chat() use them: 5 tokens (max_new_tokens), not vLLM's 16.
    assert len(llm.generate("Hello", use_tqdm=False)[0].outputs[0].token_ids) == 5
    assert len(llm.chat(CHAT, use_tqdm=False)[0].outputs[0].token_ids) <= 5


def test_generation_defaults_fill_only_what_a_request_leaves_out():
    defaults = {"temperature": 0.25, "max_tokens": 5}
    assert with_generation_defaults({"prompt": "x"}, defaults) == {"prompt": "x", "temperature": 0.25, "max_tokens": 5}
    assert with_generation_defaults({"temperature": 1.0, "max_tokens": None}, defaults) == {
        "temperature": 1.0, "max_tokens": 5}
    assert with_generation_defaults({"max_completion_tokens": 9}, defaults) == {
        "max_completion_tokens": 9, "temperature": 0.25}
    assert with_generation_defaults({"prompt": "x"}, {}) == {"prompt": "x"}


# -- outputs ------------------------------------------------------------------------------------------
def test_delta_output_kind_still_gives_whole_outputs(llm):
    params = dict(temperature=0, max_tokens=7, ignore_eos=True)
    (delta,) = llm.generate("Hello there", SamplingParams(output_kind=RequestOutputKind.DELTA, **params),
                            use_tqdm=False)
    (full,) = llm.generate("Hello there", SamplingParams(**params), use_tqdm=False)
    assert delta.finished and len(delta.outputs[0].token_ids) == 7
    assert delta.outputs[0].token_ids == full.outputs[0].token_ids and delta.outputs[0].text == full.outputs[0].text


def test_cumulative_logprob_only_with_logprobs(llm):
    (plain,) = llm.generate("Hello", GREEDY, use_tqdm=False)
    assert plain.outputs[0].cumulative_logprob is None and plain.outputs[0].logprobs is None
    (scored,) = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
                             use_tqdm=False)
    out = scored.outputs[0]
    total = sum(position[t].logprob for t, position in zip(out.token_ids, out.logprobs))
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-5) and out.cumulative_logprob < 0


def test_num_cached_tokens_and_metrics(llm):
    prompt = "one two three four five six seven eight nine ten " * 4  # over two 16-token blocks
    (first,) = llm.generate(prompt + "first", GREEDY, use_tqdm=False)
    (second,) = llm.generate(prompt + "second", GREEDY, use_tqdm=False)
    assert first.num_cached_tokens % 16 == 0 and second.num_cached_tokens >= 32
    shared = next(i for i, (a, b) in enumerate(zip(first.prompt_token_ids, second.prompt_token_ids)) if a != b)
    assert second.num_cached_tokens == shared // 16 * 16
    m = second.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time == m.finished_time
    assert m.time_in_queue == pytest.approx(m.first_scheduled_time - m.arrival_time)


# -- the constructor ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, name", [
    (dict(enforce_eager=True), TypeError, "enforce_eager"),
    (dict(tokenizer_mode="mistral"), ValueError, "tokenizer_mode"),
    (dict(skip_tokenizer_init=True), ValueError, "skip_tokenizer_init"),
    (dict(tensor_parallel_size=2), ValueError, "tensor_parallel_size"),
    (dict(generation_config="no/such/folder"), FileNotFoundError, "generation_config"),
])
def test_constructor_refusals_name_the_argument(model_dir, kwargs, error, name):
    with pytest.raises(error, match=name):
        LLM(str(model_dir), **ENGINE, **kwargs)


def test_constructor_vllm_names(model_dir):
    llm = LLM(str(model_dir), tokenizer_mode="hf", trust_remote_code=True, max_logprobs=2,
              generation_config="vllm", **ENGINE)
    assert llm.get_default_sampling_params().max_tokens == SamplingParams().max_tokens
    with pytest.raises(ValueError, match="max_logprobs=2"):
        llm.generate("Hi", SamplingParams(logprobs=3), use_tqdm=False)
