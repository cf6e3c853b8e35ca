"""vLLM's quickstart, offline, with `vllm` changed to `jaxllm`: batched generation, then a chat.

    python examples/quickstart_offline.py [MODEL]   # a local folder or .gguf, or a cached ORG/NAME id;
                                                    # default: SmolLM2-135M-Instruct
"""

import sys

from jaxllm import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

llm = LLM(model=sys.argv[1] if len(sys.argv) > 1 else None)  # vLLM: LLM(model="facebook/opt-125m")

outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")

# The model's chat template turns the conversation into its prompt.
conversation = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I assist you today?"},
    {"role": "user", "content": "Write an essay about the importance of higher education."},
]
outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
for output in outputs:
    print(f"Chat prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
