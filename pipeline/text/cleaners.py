"""Per-language text normalisation applied to one lyric line before VoiceBPE encoding (spec §4.3).

The released lyric encoder was trained on text that went through this normalisation, so the
vocabulary is built on lower-case letters, spelled-out numbers and romanised CJK/Korean text
(it has A-Z too, which num2words' capitals in German currency amounts use):
an unnormalised "3" or "你" would become ``[UNK]``. Steps, in order:

1. lower-case and drop double quotes (every language);
2. numbers → words (num2words; our own converter for Chinese, which num2words lacks):
   currency amounts, decimals, integers (the reference's ordinal step is for hu/ko only);
3. abbreviations ("dr." → "doctor") in the line's language;
4. full-width CJK punctuation → ASCII (the vocabulary only has the ASCII marks);
5. symbols ("&" → "and") in the line's language; this step ends by stripping the line, so its
   leading/trailing spaces never become [SPACE];
6. whitespace runs collapsed to single spaces;
7. script conversion: zh → pinyin with tone numbers (TONE3, syllables joined), ko → academic
   romanisation, ja → Hepburn romaji (cutlet, MeCab/UniDic-lite), hi → lower-case only.

`clean_line(text, lang)` is the only entry point the tokenizer needs.
"""
from __future__ import annotations

import logging
import re
import warnings
from functools import lru_cache

log = logging.getLogger(__name__)

# Languages whose lines get the full cleaning (numbers, abbreviations, symbols). ja and hi are
# only romanised / lower-cased, as in the released tokenizer.
CLEANED_LANGUAGES = frozenset("ar cs de en es fr hu it nl pl pt ru tr zh ko".split())

_WHITESPACE = re.compile(r"\s+")

# ---------------------------------------------------------------------------------------------
# Abbreviations: only the ones that appear in song lyrics often enough to matter; "\b...\." so
# that the dot is part of the match and words that merely start alike are left alone.
_ABBREVIATIONS: dict[str, dict[str, str]] = {
    "en": {
        "mrs": "misess", "mr": "mister", "dr": "doctor", "st": "saint", "co": "company",
        "jr": "junior", "maj": "major", "gen": "general", "drs": "doctors", "rev": "reverend",
        "lt": "lieutenant", "hon": "honorable", "sgt": "sergeant", "capt": "captain",
        "esq": "esquire", "ltd": "limited", "col": "colonel", "ft": "fort",
    },
    "es": {"sr": "señor", "sra": "señora", "srta": "señorita", "dr": "doctor", "dra": "doctora",
           "st": "santo"},
    "fr": {"mme": "madame", "mr": "monsieur", "dr": "docteur", "st": "saint", "ste": "sainte"},
    "de": {"hr": "herr", "fr": "frau", "dr": "doktor", "st": "sankt", "nr": "nummer"},
    "pt": {"sr": "senhor", "sra": "senhora", "dr": "doutor", "dra": "doutora", "st": "santo"},
    "it": {"sig": "signore", "sigra": "signora", "dr": "dottore", "st": "santo"},
    "pl": {"p": "pani", "dr": "doktor", "św": "święty"},
    "nl": {"dhr": "de heer", "mevr": "mevrouw", "dr": "dokter", "st": "sint"},
    "ru": {"г": "господин", "др": "доктор"},
}

# Symbols spelled out as words (spaces around them: "a&b" → "a and b").
_SYMBOLS: dict[str, dict[str, str]] = {
    "en": {"&": "and", "@": "at", "%": "percent", "#": "hash", "$": "dollar", "£": "pound", "°": "degree"},
    "de": {"&": "und", "@": "at", "%": "prozent", "#": "raute", "$": "dollar", "£": "pfund", "°": "grad"},
    "fr": {"&": "et", "@": "arobase", "%": "pour cent", "#": "dièse", "$": "dollar", "£": "livre", "°": "degrés"},
    "es": {"&": "y", "@": "arroba", "%": "por ciento", "#": "numeral", "$": "dólar", "£": "libra", "°": "grados"},
    "it": {"&": "e", "@": "chiocciola", "%": "per cento", "#": "cancelletto", "$": "dollaro", "£": "sterlina", "°": "gradi"},
    "pt": {"&": "e", "@": "arroba", "%": "por cento", "#": "cardinal", "$": "dólar", "£": "libra", "°": "graus"},
    "pl": {"&": "i", "@": "małpa", "%": "procent", "#": "krzyżyk", "$": "dolar", "£": "funt", "°": "stopnie"},
    "tr": {"&": "ve", "@": "at", "%": "yüzde", "#": "diyez", "$": "dolar", "£": "sterlin", "°": "derece"},
    "ru": {"&": "и", "@": "собака", "%": "процентов", "#": "номер", "$": "доллар", "£": "фунт", "°": "градус"},
    "cs": {"&": "a", "@": "zavináč", "%": "procento", "#": "křížek", "$": "dolar", "£": "libra", "°": "stupně"},
    "nl": {"&": "en", "@": "apenstaartje", "%": "procent", "#": "hekje", "$": "dollar", "£": "pond", "°": "graden"},
    "ar": {"&": "و", "@": "على", "%": "في المئة", "#": "رقم", "$": "دولار", "£": "جنيه", "°": "درجة"},
    "hu": {"&": "és", "@": "kukac", "%": "százalék", "#": "kettőskereszt", "$": "dollár", "£": "font", "°": "fok"},
    "zh": {"&": "和", "@": "在", "%": "百分", "#": "号", "$": "美元", "£": "英镑", "°": "度"},
    "ko": {"&": "그리고", "@": "에", "%": "퍼센트", "#": "번호", "$": "달러", "£": "파운드", "°": "도"},
}

# Full-width / CJK punctuation the vocabulary does not have, mapped to the ASCII mark it does.
_CJK_PUNCTUATION = str.maketrans({
    "，": ",", "。": ".", "！": "!", "？": "?", "：": ":", "；": ";", "（": "(", "）": ")",
    "、": ",", "～": "-", "—": "-", "…": "...", "「": "'", "」": "'", "『": "'", "』": "'",
    "“": "", "”": "", "‘": "'", "’": "'", "　": " ",
})

# num2words language codes (they match ours where num2words has the language).
_NUM2WORDS_LANG = {"en": "en", "de": "de", "fr": "fr", "es": "es", "it": "it", "pt": "pt",
                   "pl": "pl", "tr": "tr", "ru": "ru", "cs": "cs", "nl": "nl", "ar": "ar",
                   "hu": "hu", "ko": "ko", "ja": "ja"}


# Currency amounts: the symbol right before or right after the digits ("$45.50", "45,50€").
# The amount may hold several separators: "1.000.50$" is matched whole and then fails to parse,
# which (like any failure in this step) leaves the text to the later number steps.
_AMOUNT = r"\d(?:[\d.,]*\d)?"
# Applied in this order (GBP, USD, EUR), as the reference does.
_CURRENCIES = tuple(
    (code, re.compile(rf"{re.escape(symbol)}({_AMOUNT})|({_AMOUNT}){re.escape(symbol)}"))
    for code, symbol in (("GBP", "£"), ("USD", "$"), ("EUR", "€"))
)
# What num2words puts between the main unit and the cents in each language: for a whole amount
# everything from its LAST occurrence is dropped ("three dollars, zero cents" → "three dollars").
# It is the last occurrence even where the joiner also occurs inside the number itself, so pt
# "45€" ("quarenta e cinco euros") becomes "quarenta": that is what the released tokenizer did.
_CURRENCY_JOINERS = {
    **dict.fromkeys(("en", "pl", "cs", "ru", "nl", "ar", "tr", "hu", "ko"), ", "),
    "es": " con ", "fr": " et ", "de": " und ", "pt": " e ", "it": " e ",
}
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # English "1,000"
_THOUSANDS_DOT = re.compile(r"(?<=\d)\.(?=\d{3}\b)")  # continental "1.000"
_DECIMAL = re.compile(r"(\d+)[.,](\d+)")
_INTEGER = re.compile(r"\d+")


def _num2words(value, lang: str, to: str = "cardinal") -> str | None:
    from num2words import num2words

    code = _NUM2WORDS_LANG.get(lang)
    if code is None:
        return None
    try:
        # Not lower-cased: the reference lower-cases a line before expanding its numbers, so
        # num2words' capitals ("drei Komma fünf", "Euro") reach the BPE as they are.
        return num2words(value, lang=code, to=to)
    except (NotImplementedError, OverflowError, ValueError, TypeError, KeyError, IndexError):
        return None  # leave the digits: num2words lacks this form in this language


_ZH_DIGITS = "零一二三四五六七八九"


def _zh_below_10000(n: int) -> str:
    out, zero_pending = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit, n = divmod(n, value)
        if digit:
            if zero_pending:
                out += "零"
            out += _ZH_DIGITS[digit] + unit
            zero_pending = False
        elif out:
            zero_pending = True
    return out


def chinese_number(n: int) -> str:
    """An integer in Chinese numerals (十, 百, 千, 万, 亿), e.g. 12 → 十二, 2024 → 二千零二十四.
    num2words has no Chinese, and pypinyin leaves digits untouched."""
    if n == 0:
        return "零"
    groups = []
    while n:
        n, part = divmod(n, 10000)
        groups.append(part)
    units = ["", "万", "亿", "万亿"]
    out = ""
    for i in range(len(groups) - 1, -1, -1):
        part = groups[i]
        if part == 0:
            if out and not out.endswith("零"):
                out += "零"
            continue
        if out and part < 1000 and not out.endswith("零"):
            out += "零"
        out += _zh_below_10000(part) + (units[i] if i < len(units) else "")
    out = out.rstrip("零")
    return out[1:] if out.startswith("一十") else out  # 10..19 read 十, 十一 ...


def _number_words(match_text: str, lang: str) -> str:
    """One run of digits (optionally with a decimal part) → words; digits kept when unknown."""
    decimal = _DECIMAL.fullmatch(match_text)
    if lang == "zh":
        if decimal:
            return chinese_number(int(decimal.group(1))) + "点" + "".join(_ZH_DIGITS[int(d)] for d in decimal.group(2))
        return chinese_number(int(match_text))
    if decimal:
        words = _num2words(float(f"{decimal.group(1)}.{decimal.group(2)}"), lang)
    else:
        words = _num2words(int(match_text), lang)
    return match_text if words is None else words


def _currency_words(amount_text: str, lang: str, currency: str) -> str:
    """One amount (thousands separators already removed) in words, e.g. "45,50" USD en →
    "forty-five dollars, fifty cents". Raises whatever num2words or float() raises."""
    from num2words import num2words

    amount = float(amount_text.replace(",", "."))  # "," is read as the decimal point
    # "cz": the code the released tokenizer passed for Czech. num2words 0.5.14 calls Czech "cs",
    # so Czech currency fails there and its amounts are left to the later steps, as in the reference.
    words = num2words(amount, to="currency", currency=currency, lang="cz" if lang == "cs" else lang)
    if amount.is_integer():
        cut = words.rfind(_CURRENCY_JOINERS[lang])
        if cut != -1:
            words = words[:cut]
    # Not lower-cased: the line was lower-cased before this step, so the released tokenizer kept
    # num2words' capitals ("drei Dollar"), and the vocabulary has the capital letters.
    return words


def expand_currencies(text: str, lang: str) -> str:
    """£, $ and € amounts → words with num2words' currency form, currencies in the order GBP,
    USD, EUR. When an expansion fails (num2words lacks the currency in this language, e.g. GBP
    in pl/ru/ko or anything in tr, or the amount does not parse) the step stops there: the
    failing currency and those after it stay as they were, for the later number steps."""
    if lang not in _CURRENCY_JOINERS:
        return text
    for code, pattern in _CURRENCIES:
        try:
            text = pattern.sub(lambda m: _currency_words(m.group(1) or m.group(2), lang, code), text)
        except Exception:  # num2words raises many types: NotImplementedError, TypeError, InvalidOperation ...
            break
    return text


def expand_numbers(text: str, lang: str) -> str:
    """Digits → words in ``lang``: thousands separators removed, then currency amounts, decimals
    (not in Turkish), plain integers (no ordinal step outside hu/ko; see below). Letters glued to
    a number stay glued ("5pm" → "fivepm", "1st" → "onest"), as the released tokenizer did."""
    if lang == "en":
        text = _THOUSANDS_COMMA.sub("", text)
    else:
        text = _THOUSANDS_DOT.sub("", text)
    text = expand_currencies(text, lang)
    if lang != "tr":  # the released tokenizer left Turkish decimals to the integer step
        text = _DECIMAL.sub(lambda m: _number_words(m.group(0), lang), text)
    # Ordinals: issue #14 gives the reference's order as "... then ordinals (hu, ko); then integers",
    # i.e. no other language has an ordinal step ("21st" → "twenty-onest", as the reference
    # tokenizes it). We have no facts about the hu/ko ordinal patterns, so none is guessed: their
    # digits go to the integer step like everyone else's (a known gap for hu/ko ordinals only).
    return _INTEGER.sub(lambda m: _number_words(m.group(0), lang), text)


@lru_cache(maxsize=None)
def _abbreviation_patterns(lang: str) -> tuple[tuple[re.Pattern, str], ...]:
    table = _ABBREVIATIONS.get(lang, {})
    # Longest first so "mrs." is not eaten by "mr.".
    return tuple((re.compile(rf"\b{re.escape(abbr)}\."), full)
                 for abbr, full in sorted(table.items(), key=lambda kv: -len(kv[0])))


def expand_abbreviations(text: str, lang: str) -> str:
    for pattern, full in _abbreviation_patterns(lang):
        text = pattern.sub(full, text)
    return text


def expand_symbols(text: str, lang: str) -> str:
    """Symbols → words; ends with strip(), as the released tokenizer's symbol step did, so a
    line's leading/trailing spaces (also those "&" → " and " adds) never become [SPACE]."""
    for symbol, word in _SYMBOLS.get(lang, {}).items():
        text = text.replace(symbol, f" {word} ")
    return text.strip()


def collapse_whitespace(text: str) -> str:
    # Runs → one space, not stripped: the ends were stripped by expand_symbols (the languages
    # with full cleaning); ja and hi never come here and keep theirs.
    return _WHITESPACE.sub(" ", text)


# ---------------------------------------------------------------------------------------------
# Script conversion

def to_pinyin(text: str) -> str:
    """Chinese characters → pinyin syllables with tone digits (neutral tone 5), joined without
    spaces ("你好" → "ni3hao3"); other characters pass through."""
    from pypinyin import Style, lazy_pinyin

    return "".join(lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True))


@lru_cache(maxsize=1)
def _korean_transliter():
    from hangul_romanize import Transliter
    from hangul_romanize.rule import academic

    return Transliter(academic)


def to_korean_romanization(text: str) -> str:
    """Hangul → academic (Yale-like) romanisation ("안녕하세요" → "annyeonghase-yo")."""
    return _korean_transliter().translit(text)


@lru_cache(maxsize=1)
def _cutlet():
    """cutlet (MeCab via fugashi + the unidic-lite dictionary, all from PyPI, offline), or None
    when one of them is not installed."""
    try:
        import cutlet

        return cutlet.Cutlet()
    except Exception as exc:  # ImportError, or fugashi failing to find a dictionary
        warnings.warn(
            f"Japanese lyrics cannot be romanised ({type(exc).__name__}: {exc}); install them with "
            "`pip install cutlet fugashi unidic-lite`. Japanese lines are encoded unromanised "
            "until then (their kana/kanji become [UNK]).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def to_romaji(text: str) -> str:
    """Japanese → Hepburn romaji, lower-cased ("こんにちは世界" → "konnichiha sekai")."""
    katsu = _cutlet()
    if katsu is None:
        return text.lower()
    return katsu.romaji(text).lower()


# ---------------------------------------------------------------------------------------------

def clean_line(text: str, lang: str) -> str:
    """Normalise one lyric line in language ``lang`` (a supported code, "zh" for Chinese) into
    the lower-case, romanised text the VoiceBPE vocabulary was built on."""
    if lang == "ja":
        return to_romaji(text)
    if lang == "hi" or lang not in CLEANED_LANGUAGES:
        return text.lower()
    text = text.lower().replace('"', "")
    text = expand_numbers(text, lang)
    text = expand_abbreviations(text, lang)
    # Before the symbol step, whose strip() must come last: “ ” map to "" and could uncover spaces
    # at a line's ends ('“ hello ”'). No symbol is among these marks, so the order changes nothing else.
    text = text.translate(_CJK_PUNCTUATION)
    text = expand_symbols(text, lang)
    text = collapse_whitespace(text)
    if lang == "zh":
        text = to_pinyin(text)
    elif lang == "ko":
        text = to_korean_romanization(text)
    return text
