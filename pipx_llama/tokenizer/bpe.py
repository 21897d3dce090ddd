"""GPT-2-style byte-level BPE (``tokenizer.ggml.model == "gpt2"``), as llama.cpp's ``llm_tokenizer_bpe``.

A text fragment is cut into words by the pre-tokenizer that ``tokenizer.ggml.pre`` names (a list of
regexes applied one after the other, each splitting the pieces the previous one left, every gap
between matches kept as a piece of its own -- llama.cpp's ``unicode_regex_split``). Each word is
byte-encoded with GPT-2's byte-to-unicode table and merged pair by pair: the adjacent pair whose
merge line comes first in ``tokenizer.ggml.merges`` wins, the leftmost on a tie.

The regexes are llama.cpp's (src/llama-vocab.cpp), run with the ``regex`` module. Its ``\\s`` is the
same White_Space set llama.cpp uses; ``\\p{L}``, ``\\p{N}``, ``\\p{M}``, ``\\p{P}`` and ``\\p{S}`` are
replaced by explicit classes built from llama.cpp's own Unicode table (``unicode_ranges``), so code
points assigned in a newer Unicode version than llama.cpp's split the way llama.cpp splits them.
A regex without such a category runs in llama.cpp through ``std::wregex`` on the text with every
non-ASCII whitespace character replaced by ``\\x0b`` (unicode.cpp, ``unicode_regex_split``); so it
does here, which matters where a literal range covers such a character (deepseek's ``[ࠀ-一]``).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import regex

from pipx_llama.errors import TokenizerError
from pipx_llama.tokenizer import unicode_ranges

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BAILING = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))"
_LOWER = r"((?=[\p{L}])([^A-Z]))"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN = _UPPER + "*" + _LOWER + "+|" + _UPPER + "+" + _LOWER + r"*|\p{N}" + _TAIL
_GPT4O = (
    _UPPER
    + "*"
    + _LOWER
    + "+"
    + _CONTRACTIONS
    + "?|"
    + _UPPER
    + "+"
    + _LOWER
    + "*"
    + _CONTRACTIONS
    + r"?|\p{N}{1,3}"
    + _TAIL
)
_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_CJK_HANGUL = "[一-龥ࠀ-一가-\ud7ff]+"
_DEEPSEEK3_MAIN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)

# Pre-tokenizer regex lists, keyed like llama.cpp's LLAMA_VOCAB_PRE_TYPE_* cases.
_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (_LLAMA3,),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "bloom": (_BLOOM,),
    "viking": (_BLOOM, r"\p{N}"),
    "tekken": (_TEKKEN,),
    "gpt4o": (_GPT4O,),
    "seed-coder": (_SEED_CODER,),
    "bailingmoe": (_BAILING,),
    "minicpm5": (r"\p{N}{1,3}", _MINICPM5),
    # llama.cpp's "\s+$" is ECMAScript: "$" is the very end; Python's "$" also matches before a final "\n".
    "deepseek-llm": (
        "[\r\n]",
        _DEEPSEEK_LLM_LETTERS,
        "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
        r"\s+\Z",
        _CJK_HANGUL,
        r"\p{N}+",
    ),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    "deepseek3": (r"\p{N}{1,3}", "[一-龥\u3040-ゟ゠-ヿ]+", _DEEPSEEK3_MAIN),
}


@dataclass(frozen=True)
class PreTokenizer:
    """What a ``tokenizer.ggml.pre`` name selects in llama.cpp: regexes plus per-model flags."""

    regexes: str
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False
    no_bos: bool = False


def _pre(names: str, regexes: str, **flags: bool) -> dict[str, PreTokenizer]:
    return {name: PreTokenizer(regexes, **flags) for name in names.split()}


# tokenizer.ggml.pre -> settings, transcribed from llama_vocab::impl::load in src/llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_pre("default", "default"),
    **_pre(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
        "llama3",
        ignore_merges=True,
        add_bos=True,
    ),
    **_pre("dbrx smaug-bpe", "llama3"),
    **_pre(
        "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo jais"
        " exaone4 jina-v1-en jina-v2-code roberta-bpe",
        "gpt2",
    ),
    **_pre("trillion granite-docling", "gpt2", clean_spaces=False),
    **_pre("starcoder refact codeshell exaone minerva-7b mellum2", "starcoder"),
    **_pre("smollm command-r", "starcoder", clean_spaces=False),
    **_pre("qwen2 deepseek-r1-qwen kormo f2llmv2", "qwen2", clean_spaces=False),
    **_pre("stablelm2 megrez", "qwen2"),
    **_pre("hunyuan solar-open grok-2", "qwen2", clean_spaces=False),
    **_pre("qwen35", "qwen35", clean_spaces=False),
    **_pre("chatglm-bpe", "llama3", no_bos=True),
    **_pre("glm4 glm5", "llama3", no_bos=True, ignore_merges=True),
    **_pre("falcon", "falcon"),
    **_pre("bloom gpt3-finnish", "bloom"),
    **_pre("poro-chat", "bloom", clean_spaces=False),
    **_pre("viking", "viking", clean_spaces=False),
    **_pre("tekken", "tekken", clean_spaces=False, ignore_merges=True, add_bos=True),
    **_pre("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt4o", clean_spaces=False),
    **_pre("seed-coder", "seed-coder", clean_spaces=False),
    **_pre("bailingmoe bailingmoe2 llada-moe", "bailingmoe", clean_spaces=False),
    **_pre("minicpm5", "minicpm5", ignore_merges=True),
    **_pre("deepseek-llm", "deepseek-llm", clean_spaces=False),
    **_pre("deepseek-coder", "deepseek-coder", clean_spaces=False),
    **_pre("deepseek-v3 hunyuan-dense joyai-llm hy_v4", "deepseek3", clean_spaces=False),
}

_COMPILED: dict[str, list[tuple[regex.Pattern[str], bool]]] = {}
# Non-ASCII White_Space -> "\x0b", for the regexes llama.cpp matches with std::wregex (see the module doc).
# llama.cpp's unicode_set_whitespace above U+007F.
NON_ASCII_WHITESPACE = (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)
_WS_TO_VT = dict.fromkeys(NON_ASCII_WHITESPACE, "\x0b")
_NON_ASCII_WS = frozenset(map(chr, _WS_TO_VT))


def pre_tokenizer(name: str, source: str) -> PreTokenizer:
    """The settings ``tokenizer.ggml.pre`` names; an unknown name is a TokenizerError naming it."""
    pre = PRE_TOKENIZERS.get(name)
    if pre is None:
        raise TokenizerError(
            f"{source}: unknown pre-tokenizer '{name}' (tokenizer.ggml.pre)",
            "this model's tokenizer is not supported yet; known pre-tokenizers: "
            + ", ".join(sorted(PRE_TOKENIZERS)),
        )
    return pre


def _class_body(ranges: tuple[int, ...]) -> str:
    return "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in zip(ranges[::2], ranges[1::2]))


_CATEGORY_CLASSES = {
    "L": _class_body(unicode_ranges.LETTER),
    "N": _class_body(unicode_ranges.NUMBER),
    "M": _class_body(unicode_ranges.ACCENT_MARK),
    "P": _class_body(unicode_ranges.PUNCTUATION),
    "S": _class_body(unicode_ranges.SYMBOL),
}


def with_llama_categories(pattern: str) -> str:
    """Replace ``\\p{L}`` etc. by explicit classes from llama.cpp's Unicode table (see unicode_ranges)."""
    out = []
    inside = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if pattern.startswith("\\p{", i):
                end = pattern.index("}", i)
                body = _CATEGORY_CLASSES[pattern[i + 3 : end]]
                out.append(body if inside else "[" + body + "]")
                i = end + 1
            else:
                out.append(pattern[i : i + 2])
                i += 2
            continue
        if ch == "[" and not inside:
            inside = True
        elif ch == "]" and inside:
            inside = False
        out.append(ch)
        i += 1
    return "".join(out)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's table: printable bytes map to themselves, the rest to U+0100 upwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_ENCODER: list[str] = _bytes_to_unicode()
BYTE_DECODER: dict[str, int] = {c: b for b, c in enumerate(BYTE_ENCODER)}
# str.translate table: a latin-1 decoded byte string becomes its byte-encoded form in one C call.
_TRANSLATE = {b: c for b, c in enumerate(BYTE_ENCODER)}
_INF = 1 << 62
# Words longer than this merge through a heap (n log n); shorter ones with a list scan, which is faster there.
_HEAP_THRESHOLD = 128
_CACHE_LIMIT = 200_000


def decode_bpe_text(text: str) -> bytes:
    """Bytes of a byte-encoded vocab string. Characters outside the table pass through as UTF-8."""
    get = BYTE_DECODER.get
    out = bytearray()
    for ch in text:
        b = get(ch)
        if b is None:
            out += ch.encode("utf-8", "surrogateescape")
        else:
            out.append(b)
    return bytes(out)


class BpeModel:
    """Byte-level BPE over one vocabulary; ``encode_fragment`` tokenizes text holding no special tokens."""

    def __init__(
        self,
        token_to_id: dict[str, int],
        merges: list[str],
        pre_name: str,
        source: str,
    ) -> None:
        pre = pre_tokenizer(pre_name, source)
        self.pre = pre
        self._token_to_id = token_to_id
        self._merges = merges
        self._ranks: dict[str, int] | None = None
        patterns = _COMPILED.get(pre.regexes)
        if patterns is None:
            patterns = [
                (regex.compile(with_llama_categories(p)), "\\p{" not in p) for p in _REGEXES[pre.regexes]
            ]
            _COMPILED[pre.regexes] = patterns
        self._patterns = patterns
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def ranks(self) -> dict[str, int]:
        """``"left right" -> rank``; built on first use. The first of duplicate merge lines wins."""
        if self._ranks is None:
            merges = self._merges
            n = len(merges)
            # dict() keeps the last value per key, so feed the lines backwards to keep the first.
            self._ranks = dict(zip(reversed(merges), range(n - 1, -1, -1)))
        return self._ranks

    def split_words(self, text: str) -> list[str]:
        """The pre-tokenizer's words, before byte encoding."""
        pieces = [text]
        has_ws = not _NON_ASCII_WS.isdisjoint(text)
        for pattern, wide in self._patterns:
            out: list[str] = []
            for piece in pieces:
                pos = 0
                # The substitution keeps one character per code point, so match offsets hold for ``piece``.
                target = piece.translate(_WS_TO_VT) if wide and has_ws else piece
                for m in pattern.finditer(target):
                    start, end = m.span()
                    if start > pos:
                        out.append(piece[pos:start])
                    if end > start:
                        out.append(piece[start:end])
                    pos = end
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def encode_fragment(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for word in self.split_words(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._encode_word(word)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _encode_word(self, word: str) -> tuple[int, ...]:
        token_to_id = self._token_to_id
        enc = word.encode("utf-8").decode("latin-1").translate(_TRANSLATE)
        if self.pre.ignore_merges:
            tid = token_to_id.get(enc)
            if tid is not None:
                return (tid,)
        syms = list(enc)
        if len(syms) > 1:
            syms = (
                _merge_heap(syms, self.ranks)
                if len(syms) > _HEAP_THRESHOLD
                else _merge_scan(syms, self.ranks)
            )
        ids: list[int] = []
        for sym in syms:
            tid = token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
                continue
            # llama.cpp then looks up each byte of the symbol's UTF-8 as a one-byte string:
            # only ASCII characters can match; the rest are dropped.
            for ch in sym:
                if ord(ch) < 0x80:
                    tid = token_to_id.get(ch)
                    if tid is not None:
                        ids.append(tid)
        return tuple(ids)


def _merge_scan(syms: list[str], ranks: dict[str, int]) -> list[str]:
    """Merge the best pair (lowest rank, then leftmost) until none has a rank; O(n^2), fast for short
    words."""
    get = ranks.get
    pair_ranks = [get(a + " " + b, _INF) for a, b in itertools.pairwise(syms)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _INF:
            break
        i = pair_ranks.index(best)
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get(syms[i - 1] + " " + syms[i], _INF)
        if i < len(pair_ranks):
            pair_ranks[i] = get(syms[i] + " " + syms[i + 1], _INF)
    return syms


def _merge_heap(syms: list[str], ranks: dict[str, int]) -> list[str]:
    """The same merge order as ``_merge_scan`` through a heap of (rank, left index), like llama.cpp."""
    get = ranks.get
    n = len(syms)
    text = list(syms)
    alive = [True] * n
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    heap: list[tuple[int, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        merged = text[left] + text[right]
        rank = get(text[left] + " " + text[right])
        if rank is not None:
            heapq.heappush(heap, (rank, left, right, merged))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, right, merged = heapq.heappop(heap)
        # A stale entry: one side was merged away or grew since the pair was queued.
        if not alive[left] or not alive[right] or text[left] + text[right] != merged:
            continue
        text[left] = merged
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push(prev[left], left)
        push(left, nxt[left])
    out = []
    i = 0
    while i >= 0:
        out.append(text[i])
        i = nxt[i]
    return out
