"""Build small, real, random-weight cross-encoders offline, for the demo and the tests.

The models are genuine ``transformers`` sequence-classification models (XLM-RoBERTa, the
bge-reranker-v2-m3 architecture, or BERT) with a tokenizer trained by ``tokenizers`` on the
given texts, saved as a Hugging Face directory with safetensors weights. Their scores are
meaningless; the code path is the one real models take.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SAMPLE_TEXTS = [
    "what is the capital of france",
    "paris is the capital and most populous city of france",
    "how do solar panels produce electricity",
    "photovoltaic cells convert sunlight directly into electric current",
    "best way to learn a new programming language",
    "practice small projects every day and read other people's code",
    "the quick brown fox jumps over the lazy dog",
    "rerankers score each query and document pair with a cross encoder",
    "la capitale de la france est paris",
    "die hauptstadt von deutschland ist berlin",
]


# The test models' shape: two layers, hidden size 32.
TINY_SHAPE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
# bge-reranker-v2-m3's shape (XLM-RoBERTa large): for benchmarks, with random weights.
BGE_M3_SHAPE = {
    "vocab_size": 250002,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 8194,
}


def xlmr_config(**shape):
    """An ``XLMRobertaConfig`` with bge-reranker-v2-m3's special ids, LayerNorm eps and one
    output label; ``shape`` sets the sizes (tiny by default, ``BGE_M3_SHAPE`` full size)."""
    from transformers import XLMRobertaConfig

    sizes = {"vocab_size": 400, **TINY_SHAPE, "max_position_embeddings": 520, **shape}
    return XLMRobertaConfig(
        **sizes,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        num_labels=1,
    )


def bert_config(**shape):
    """A ``BertConfig`` with two token types and one output label; ``shape`` sets the sizes
    (tiny by default)."""
    from transformers import BertConfig

    sizes = {"vocab_size": 400, **TINY_SHAPE, "max_position_embeddings": 520, **shape}
    return BertConfig(**sizes, type_vocab_size=2, pad_token_id=0, num_labels=1)


def random_classifier(config, seed: int = 0):
    """A sequence-classification model of ``config`` with random weights drawn after
    ``torch.manual_seed(seed)``, in eval mode."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


# Each kind's special tokens in vocabulary order (ids 0, 1, 2, ...) and the roles they play.
XLMR_SPECIALS = {
    "<s>": ("bos_token", "cls_token"),
    "<pad>": ("pad_token",),
    "</s>": ("eos_token", "sep_token"),
    "<unk>": ("unk_token",),
    "<mask>": ("mask_token",),
}
BERT_SPECIALS = {
    "[PAD]": ("pad_token",),
    "[UNK]": ("unk_token",),
    "[CLS]": ("cls_token",),
    "[SEP]": ("sep_token",),
    "[MASK]": ("mask_token",),
}


def xlmr_tokenizer(tok, **kwargs):
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` whose vocabulary starts
    ``<s> <pad> </s> <unk>``: XLM-R's special tokens and pair template
    (``<s> A </s></s> B </s>``)."""
    return _fast_tokenizer(tok, XLMR_SPECIALS, "</s> $B </s>", **kwargs)


def bert_tokenizer(tok, **kwargs):
    """A ``PreTrainedTokenizerFast`` around a ``tokenizers.Tokenizer`` whose vocabulary starts
    ``[PAD] [UNK] [CLS] [SEP]``: BERT's special tokens and pair template
    (``[CLS] A [SEP] B [SEP]``, the second part of token type 1)."""
    return _fast_tokenizer(tok, BERT_SPECIALS, "$B:1 [SEP]:1", **kwargs)


def _fast_tokenizer(tok, specials, second, **kwargs):
    """``tok`` with the template ``<cls> A <sep>`` for one text and that followed by
    ``second`` for a pair, in a ``PreTrainedTokenizerFast`` that knows ``specials``' roles."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    roles = {role: token for token, played in specials.items() for role in played}
    cls, sep = roles["cls_token"], roles["sep_token"]
    single = f"{cls} $A {sep}"
    tok.post_processor = processors.TemplateProcessing(
        single=single,
        pair=f"{single} {second}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles, **kwargs)


def build_tiny_reranker(
    out_dir: str | Path,
    kind: str = "xlm-roberta",
    texts: Iterable[str] = SAMPLE_TEXTS,
    seed: int = 0,
    max_position_embeddings: int = 520,
) -> Path:
    """Save a 2-layer cross-encoder and its tokenizer under ``out_dir``; return the path."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kind == "xlm-roberta":
        specials, make_tokenizer, make_config = XLMR_SPECIALS, xlmr_tokenizer, xlmr_config
        tok = Tokenizer(models.WordPiece(unk_token="<unk>", max_input_chars_per_word=100))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        input_names = ["input_ids", "attention_mask"]
    elif kind == "bert":
        specials, make_tokenizer, make_config = BERT_SPECIALS, bert_tokenizer, bert_config
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    else:
        raise ValueError(f"kind is {kind!r}; choose 'xlm-roberta' or 'bert'.")
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=list(specials))
    tok.train_from_iterator(list(texts), trainer)
    fast = make_tokenizer(tok, model_input_names=input_names)
    config = make_config(
        vocab_size=tok.get_vocab_size(), max_position_embeddings=max_position_embeddings
    )
    model = random_classifier(config, seed)
    # Random init gives near-constant logits; widen the head so scores spread out.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("classifier", "bert.pooler")):
                p.mul_(20.0)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out
