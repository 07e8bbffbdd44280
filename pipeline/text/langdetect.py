"""Which language one lyric line is in (for its cleaner and its language-tag token).

The reference pipeline asks a py3langid-based segmenter (LangSegment) for the languages of a line
and takes the one covering most of it. We do the same with our own small segmenter:

1. the line is cut into runs of one script (Latin, Han, kana, Hangul, Cyrillic, Arabic,
   Devanagari) and the Latin runs further at sentence punctuation (, . ! ? ; : ¿ ¡), because a
   short clause in another language must not be averaged into its neighbour;
2. each run gets a language: by script where the script decides it (Hangul → ko, kana → ja,
   Han → zh, or ja when the line has kana, Devanagari → hi, Cyrillic → ru, Arabic → ar: the
   only supported language of each script), otherwise from py3langid
   (the langid.py model, 97 languages, no restriction: like the reference, a run identified as an
   unsupported language counts as that language and so can turn the line into "en");
3. runs are weighed by their length in characters (punctuation included, outer spaces not);
   the heaviest language wins (on a tie, the first);
4. a language the lyric vocabulary has no tag for falls back to "en"; "zh-*" → "zh".

Short or ambiguous lines can come out as another language (py3langid is trained on longer text);
lines such as "[verse]" are not detected at all — the tokenizer encodes structure tags as en.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Languages with a tag token in the released vocabulary (spec §4.3).
SUPPORTED_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "pl", "tr", "ru", "cs", "nl", "ar",
                       "zh", "ja", "hu", "ko", "hi")

# A clause: optional opening marks (¿ ¡), text, its closing marks — punctuation stays with the
# clause it belongs to, so it counts toward that clause's length.
_CLAUSE = re.compile(r"[¿¡]*[^,.!?;:¿¡]+[,.!?;:]*|[¿¡,.!?;:]+")


def _script(ch: str) -> str | None:
    """The script class of one character; None for digits, spaces and punctuation."""
    if not ch.isalpha():
        return None
    code = ord(ch)
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9D:
        return "kana"
    if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2FA1F or 0xF900 <= code <= 0xFAFF:
        return "han"
    name = unicodedata.name(ch, "")
    for script in ("CYRILLIC", "ARABIC", "DEVANAGARI", "GREEK", "HEBREW", "THAI"):
        if name.startswith(script):
            return script.lower()
    return "latin"


def _runs(line: str) -> list[tuple[str, str]]:
    """(script, text) runs; characters without a script join the current run."""
    runs: list[tuple[str, str]] = []
    current, buf = None, []
    for ch in line:
        script = _script(ch)
        if script is not None and current is not None and script != current:
            runs.append((current, "".join(buf)))
            buf = []
        if script is not None:
            current = script
        buf.append(ch)
    if buf and current is not None:
        runs.append((current, "".join(buf)))
    return runs


def identify(text: str) -> str:
    """py3langid's best language code for ``text`` (any language of its model; 0.3.0, the
    version the reference used, has the 97-language langid.py model)."""
    import py3langid

    return str(py3langid.classify(text)[0])


def _letters(text: str) -> int:
    return sum(1 for ch in text if ch.isalpha())


def line_language_weights(line: str) -> Counter:
    """{language: characters} over the runs of one line (before the fallback to en)."""
    weights: Counter = Counter()
    runs = _runs(line)
    has_kana = any(script == "kana" for script, _ in runs)
    for script, text in runs:
        if script == "latin":
            for clause in _CLAUSE.findall(text):
                if _letters(clause):
                    weights[identify(clause.strip())] += len(clause.strip())
            continue
        lang = {
            "kana": "ja",
            "hangul": "ko",
            "han": "ja" if has_kana else "zh",
            # The vocabulary's only Cyrillic / Arabic-script languages: py3langid would call a short
            # Russian line Bulgarian (unsupported → en, tagged wrongly).
            "cyrillic": "ru",
            "arabic": "ar",
            "devanagari": "hi",
        }.get(script)
        weights[lang or identify(text.strip())] += len(text.strip())
    return weights


def detect_line_language(line: str) -> str:
    """The supported language code ("zh" for Chinese) used to clean and tag ``line``."""
    weights = line_language_weights(line)
    if not weights:
        return "en"
    lang = weights.most_common(1)[0][0]
    if lang.startswith("zh"):
        lang = "zh"
    return lang if lang in SUPPORTED_LANGUAGES else "en"
