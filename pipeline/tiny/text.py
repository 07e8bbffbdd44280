"""Tiny text parts for tests and the demo: a random UMT5 encoder folder and a demo lyric vocabulary.

Both are written in the released formats so they load through the real code paths:
- ``umt5-base/``: config.json + model.safetensors (transformers ``UMT5EncoderModel``) and a fast
  tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) that AutoTokenizer
  reads offline. The tokenizer is a small Unigram model trained here on music-tag words with the
  T5 conventions (<pad>=0, </s>=1, <unk>=2, Metaspace, </s> appended to every text).
- the lyric vocabulary: a `tokenizers` BPE JSON with a Whitespace pre-tokenizer and the VoiceBPE
  special tokens, trained on the demo lyrics after the same cleaning the tokenizer applies.
Weights are random: the outputs are meaningless and only the shapes and plumbing are real.
"""
from __future__ import annotations

import json
from pathlib import Path

# Words a music-tag prompt is made of; the tiny tokenizer is trained on sentences of them.
_TAG_WORDS = """
pop rock jazz blues funk soul disco house techno trance ambient lofi hip hop rap trap drill
metal punk indie folk country reggae ska dub drum bass dubstep edm electronic synthwave
classical orchestral cinematic opera gospel choir acoustic electric guitar piano keys organ
synth strings violin cello bass drums percussion kick snare hats claps bells flute sax
trumpet horns brass harp ukulele banjo mandolin accordion vocals vocal female male singer
duet harmony chorus verse bridge intro outro hook melody melodic rhythm groove beat tempo
bpm slow fast upbeat downtempo mid energetic chill calm relaxing dreamy dark bright happy
sad melancholic romantic epic aggressive uplifting emotional nostalgic warm cold atmospheric
ethereal heavy soft loud gentle smooth raw gritty lush minimal catchy anthemic powerful
catchy dance club party summer night love heartbreak road city rain ocean sunset morning
spanish chinese japanese korean english french german latin african k-pop j-pop c-pop
mandarin cantonese rnb r&b neo-soul boom bap 808 autotune reverb distortion analog vintage
modern retro eighties nineties live studio recording instrumental cover remix mashup
""".split()


def _tag_sentences(n: int = 400) -> list[str]:
    """Deterministic prompt-like sentences over the tag words (no randomness needed)."""
    words = _TAG_WORDS
    out = []
    for i in range(n):
        k = 2 + i % 6
        out.append(", ".join(words[(i * 7 + j * 13) % len(words)] for j in range(k)))
    return out + words


def save_tiny_umt5(
    folder: str | Path,
    seed: int = 0,
    d_model: int = 12,
    vocab_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 2,
    d_kv: int = 4,
    d_ff: int = 24,
) -> Path:
    """Write a random ``UMT5EncoderModel`` + its tokenizer to ``folder`` (the ``umt5-base/`` layout).

    ``vocab_size``: embedding rows (default: the tokenizer's size; must not be smaller).
    ``num_layers``: encoder blocks; ≥ 10 to exercise the ERG hooks on blocks 8 and 9.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(_tag_sentences(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    # T5 appends </s> to every text (spec §1.4): the mask and length include it.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is None:
        vocab_size = n_tokens
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer's {n_tokens} tokens")

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)
    fast.save_pretrained(str(folder))
    # Not every transformers version writes it; the released folder has it.
    special_map = folder / "special_tokens_map.json"
    if not special_map.exists():
        special_map.write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
                                          indent=2), encoding="utf-8")

    config = UMT5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
        num_decoder_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False,
        use_cache=False, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _cleaned_lines(corpus_texts: list[str]) -> list[str]:
    """The demo lyrics as the tokenizer will see them: cleaned and romanised per line."""
    from pipeline.text.cleaners import clean_line
    from pipeline.text.langdetect import detect_line_language

    lines = []
    for text in corpus_texts:
        for line in text.split("\n"):
            if line.strip():
                lang = "en" if line.lstrip().startswith("[") else detect_line_language(line)
                lines.append(clean_line(line, lang))
    return lines


def save_demo_lyric_vocab(path: str | Path, corpus_texts: list[str], vocab_size: int = 600) -> int:
    """Write a small VoiceBPE-format vocabulary trained on ``corpus_texts`` to ``path`` and return
    its number of ids (the demo transformer's ``lyric_encoder_vocab_size`` must cover it).

    Ids: [STOP]=0, [UNK]=1, [SPACE]=2, [START]=3, then the language tags and the 12 structure
    tags, then the ASCII letters, digits and punctuation (so any cleaned English line encodes
    without [UNK]) and the learned merges.
    """
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from pipeline.text.lyrics import LANGUAGE_TAGS, SPACE, START, STOP, STRUCTURE_TAGS, UNK

    specials = [STOP, UNK, SPACE, START, *LANGUAGE_TAGS.values(), *STRUCTURE_TAGS]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list(string.ascii_lowercase + string.digits + "!'(),-.:;?")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_cleaned_lines(corpus_texts) or ["la"], trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok.get_vocab_size(with_added_tokens=True)
