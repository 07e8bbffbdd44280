"""The lyric tokenizer: lyrics text → VoiceBPE token ids for the transformer's lyric encoder.

ACE-Step v1's lyric encoder reads ids of its own BPE vocabulary (``vocab.json`` of the ACE-Step
repository, ``acestep/models/lyrics_utils/vocab.json``; a `tokenizers` JSON file). Users point
``params.yaml → models → lyric_vocab`` at their copy; the demo builds a small one
(pipeline/tiny/text.py). Special tokens are looked up by their string in that file, so a demo
vocabulary with other ids works the same way.

One line (``encode``): clean in its language (pipeline/text/cleaners.py), prefix the language tag
(``[zh-cn]`` for Chinese), write every space as ``[SPACE]``, BPE-encode. A whole text
(``tokenize``): ``[START]``, then per line its tokens followed by ``[SPACE]`` (an empty line is a
lone ``[SPACE]``); the language is detected per line, and lines that start with a ``[...]`` tag
are encoded as English so "[chorus]" hits its single structure token.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import CheckpointError
from pipeline.text.cleaners import clean_line
from pipeline.text.langdetect import SUPPORTED_LANGUAGES, detect_line_language

MAX_LYRIC_TOKENS = 4096  # the official dataset cuts every song's ids to this many (spec §4.3)

# The 12 section tags the released vocabulary holds as single lower-case tokens.
STRUCTURE_TAGS = ("[start]", "[intro]", "[verse]", "[chorus]", "[bridge]", "[outro]", "[end]",
                  "[inst]", "[solo]", "[hook]", "[pre-chorus]", "[break]")

# Language code → its tag token in the vocabulary (Chinese is tagged zh-cn).
LANGUAGE_TAGS = {lang: f"[{'zh-cn' if lang == 'zh' else lang}]" for lang in SUPPORTED_LANGUAGES}

STOP, UNK, SPACE, START = "[STOP]", "[UNK]", "[SPACE]", "[START]"

_STRUCTURE_LINE = re.compile(r"^\[.*?\]")

VOCAB_HINT = (
    "point params.yaml → models → lyric_vocab at acestep/models/lyrics_utils/vocab.json of your "
    "ACE-Step checkout (or run `aceturbo demo` for the demo vocabulary)"
)


def truncate_lyric_ids(ids: list[int], max_tokens: int = MAX_LYRIC_TOKENS) -> list[int]:
    """The first ``max_tokens`` ids, as the official training dataset keeps them."""
    return list(ids[:max_tokens])


class LyricTokenizer:
    """VoiceBPE lyric tokenizer over a `tokenizers` vocabulary file."""

    def __init__(self, vocab_path: str | Path):
        from tokenizers import Tokenizer

        path = Path(vocab_path)
        if not path.is_file():
            raise CheckpointError(f"lyric vocabulary not found at '{path}': {VOCAB_HINT}.")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(
                f"lyric vocabulary '{path}' is not a tokenizers JSON file ({str(exc).splitlines()[0][:120]}): "
                f"{VOCAB_HINT}."
            ) from None
        self.path = path
        missing = [t for t in (STOP, UNK, SPACE, START) if self._tok.token_to_id(t) is None]
        if missing:
            raise CheckpointError(
                f"lyric vocabulary '{path}' lacks the special tokens {', '.join(missing)}: it is not "
                f"an ACE-Step VoiceBPE vocabulary; {VOCAB_HINT}."
            )
        self.stop_id = self._tok.token_to_id(STOP)
        self.unk_id = self._tok.token_to_id(UNK)
        self.space_id = self._tok.token_to_id(SPACE)
        self.start_id = self._tok.token_to_id(START)

    @property
    def vocab_size(self) -> int:
        """Number of ids (added tokens included): the lyric embedding must have at least this many rows."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def require_fits(self, embedding_rows: int, checkpoint: str | Path) -> None:
        """A clear error instead of an index error deep in the model (a device-side assert on CUDA)
        when this vocabulary has more ids than the checkpoint's lyric embedding has rows."""
        if self.vocab_size > embedding_rows:
            raise CheckpointError(
                f"lyric vocabulary {self.path} has {self.vocab_size} ids but the transformer in {checkpoint} "
                f"embeds only {embedding_rows}: use the vocab.json that belongs to this checkpoint "
                f"(params.yaml → models → lyric_vocab)."
            )

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    def encode(self, text: str, lang: str) -> list[int]:
        """Ids of one line in language ``lang`` (supported code; "zh" or "zh-cn" for Chinese),
        starting with the language-tag id."""
        if lang.startswith("zh"):
            lang = "zh"
        if lang not in LANGUAGE_TAGS:
            raise ValueError(f"unsupported lyric language {lang!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")
        cleaned = clean_line(text, lang)
        marked = LANGUAGE_TAGS[lang] + cleaned.replace(" ", SPACE)
        return self._tok.encode(marked, add_special_tokens=False).ids

    def line_language(self, line: str) -> str:
        """The language a line of a whole text is encoded in (structure-tag lines: en)."""
        if _STRUCTURE_LINE.match(line):
            return "en"
        return detect_line_language(line)

    def tokenize(self, lyrics: str) -> list[int]:
        """Ids of a whole lyrics text as the reference inference pipeline assembles them:
        ``[START]``, then each line's ids + ``[SPACE]`` (an empty line: ``[SPACE]`` alone).
        Empty text gives ``[START, SPACE]`` like the reference's tokenizer function; the pipeline
        rule "no lyrics → id [0], mask [0]" is `ids_and_mask`."""
        ids = [self.start_id]
        for line in lyrics.split("\n"):
            if not line.strip():
                ids.append(self.space_id)
                continue
            ids += self.encode(line, self.line_language(line))
            ids.append(self.space_id)
        return ids

    def ids_and_mask(self, lyrics: str, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask) for the transformer: no lyrics → ``[STOP]`` with mask 0 (the inference
        pipeline's null lyrics); else `tokenize`, optionally cut to ``max_tokens``, mask all ones."""
        if not lyrics.strip():
            return [self.stop_id], [0]
        ids = self.tokenize(lyrics)
        if max_tokens is not None:
            ids = truncate_lyric_ids(ids, max_tokens)
        return ids, [1] * len(ids)


