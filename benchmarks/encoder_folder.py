"""A model folder at one of jaxllm's encoder shapes (jaxllm.models.shapes.ENCODER_SHAPES), without weights:
what vLLM's dummy load and sentence-transformers read, so both peers of benchmarks/embeddings.py start offline.

The folder holds the transformers config.json, sentence-transformers' modules.json and pooling files (the
pooling of ENCODER_POOLING, then Normalize) and a tokenizer of exactly the shape's vocabulary. The tokenizer
is a word-level placeholder ("t123" is token 123) with the model type's special tokens at their usual ids:
the inputs are token ids, so it encodes nothing; it is there because vLLM's pooling runner and
sentence-transformers' Transformer module will not start without one.
"""

from __future__ import annotations

import json
import os

from jaxllm.models.shapes import ENCODER_POOLING, ENCODER_SHAPES

# Special tokens at their ids in the real vocabularies (bert-base-uncased's, XLM-RoBERTa's); XLM-R's mask is
# its last token. The role names are transformers' special-token attributes.
BERT_SPECIAL = {"pad_token": ("[PAD]", 0), "unk_token": ("[UNK]", 100), "cls_token": ("[CLS]", 101),
                "sep_token": ("[SEP]", 102), "mask_token": ("[MASK]", 103)}
XLM_R_SPECIAL = {"bos_token": ("<s>", 0), "cls_token": ("<s>", 0), "pad_token": ("<pad>", 1),
                 "eos_token": ("</s>", 2), "sep_token": ("</s>", 2), "unk_token": ("<unk>", 3),
                 "mask_token": ("<mask>", -1)}


def max_model_len(shape: str) -> int:
    """The longest input at `shape`: its positions less XLM-R's padding offset, at most 8192."""
    s = ENCODER_SHAPES[shape]
    return min(s["max_position_embeddings"] - s.get("position_offset", 0), 8192)


def is_xlm_roberta(shape: str) -> bool:
    return ENCODER_SHAPES[shape]["architecture"] == "XLMRobertaModel"


def encoder_config(shape: str, dtype: str | None = None):
    """`shape`'s transformers config. position_embedding_type is written although transformers 5 dropped it:
    vLLM's BERT and XLM-R models still read it."""
    import transformers

    s = ENCODER_SHAPES[shape]
    fields = dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                  max_position_embeddings=s["max_position_embeddings"], position_embedding_type="absolute",
                  architectures=[s["architecture"]])
    if dtype is not None:
        fields["torch_dtype"] = dtype
    if is_xlm_roberta(shape):
        return transformers.XLMRobertaConfig(**fields, type_vocab_size=s["type_vocab_size"],
                                             pad_token_id=s["pad_token_id"], layer_norm_eps=s["layer_norm_eps"])
    return transformers.BertConfig(**fields)


def placeholder_tokenizer(shape: str):
    """A transformers fast tokenizer of exactly `shape`'s vocabulary size, special tokens at their real ids."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    size = ENCODER_SHAPES[shape]["vocab_size"]
    special = XLM_R_SPECIAL if is_xlm_roberta(shape) else BERT_SPECIAL
    texts = {i % size: text for text, i in special.values()}  # a role may share its token (XLM-R's cls is bos)
    vocab = {texts.get(i, f"t{i}"): i for i in range(size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=special["unk_token"][0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inputs = ["input_ids", "attention_mask"] if is_xlm_roberta(shape) else ["input_ids", "token_type_ids",
                                                                            "attention_mask"]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_model_len(shape),
                                                model_input_names=inputs,
                                                **{role: text for role, (text, _) in special.items()})


def encoder_folder(shape: str, dtype: str, folder: str) -> str:
    """Write `shape`'s config.json (weights in `dtype`), its placeholder tokenizer and sentence-transformers'
    modules.json, 1_Pooling/config.json and sentence_bert_config.json into `folder`, and return it."""
    encoder_config(shape, dtype).save_pretrained(folder)
    placeholder_tokenizer(shape).save_pretrained(folder)
    pooling = ENCODER_POOLING[shape]
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                         {"idx": 2, "name": "2", "path": "2_Normalize",
                          "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": {"word_embedding_dimension": ENCODER_SHAPES[shape]["hidden_size"],
                                  "pooling_mode_cls_token": pooling == "CLS",
                                  "pooling_mode_mean_tokens": pooling == "MEAN"},
        "sentence_bert_config.json": {"max_seq_length": max_model_len(shape), "do_lower_case": False},
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    return folder
