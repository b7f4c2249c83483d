"""An offline CLIP-format tokenizer for ShapeWorld: byte-level vocabulary plus BPE merges learned on the
ShapeWorld words, so every ShapeWorld word is one token and other text still tokenizes byte by byte.
Written as ``vocab.json`` + ``merges.txt``, it loads with ``transformers.CLIPTokenizer.from_pretrained``."""
from __future__ import annotations

import json
from pathlib import Path

from .world import WORDS

MAX_LENGTH = 16


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(directory, model_max_length: int = MAX_LENGTH):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=5000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    seen = set(vocab)
    for m in merges:
        t = m.replace(" ", "")
        if t not in seen:
            vocab.append(t)
            seen.add(t)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length,
                                                         "tokenizer_class": "CLIPTokenizer"}))
    return CLIPTokenizer.from_pretrained(str(d))
