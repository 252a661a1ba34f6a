"""Incremental detokenisation equals a full decode, token by token, for SmolLM2's byte-level
BPE and for a Llama-style SentencePiece tokenizer (byte fallback, Metaspace, Strip); stop
strings cut exactly where a full decode would and are never emitted, even in part.

Randomized differential test against the simplest correct version (decode everything each
step); fixed seeds in CI, more with `pytest --fuzz-seeds N`.
"""

from __future__ import annotations

import json
import random

import pytest

from cold_ray.engine.detok import _WINDOW, IncrementalDetokenizer, byte_fallback_ids

CI_SEEDS = 4
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ça va très bien, merci ! Über naïve café, señor.",
    "中文文本测试，你好世界。日本語のテキスト。한국어 텍스트",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷 mixed with text",
    "  indented   code:\n\tdef f(x):\n\t\treturn x ** 2  # comment\n",
    "math: ∑ x² ≥ ∫ f(t) dt ≈ 3.14159… and arrows → ← ↑",
    "ХОРОШО ελληνικά עברית العربية",
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from cold_ray.model.loader import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def llama_sp():
    """A Llama-style SentencePiece BPE built here: byte_fallback, Metaspace pre-tokenizer,
    decoder Replace('▁', ' ') + ByteFallback + Fuse + Strip, <0x00>..<0xFF> in the vocabulary.
    Its alphabet is limited, so rarer characters (most CJK, emoji, 'H') fall back to bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=50
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def pytest_generate_tests(metafunc):
    if "seed" in metafunc.fixturenames:
        metafunc.parametrize("seed", range(metafunc.config.getoption("--fuzz-seeds") or CI_SEEDS))


def full_decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()):
    """Feed ids as the engine does; returns (deltas, number of tokens fed, detok)."""
    d = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    fed = 0
    for t in ids:
        fed += 1
        deltas.append(d.add(t))
        if d.stopped:
            break
    deltas.append(d.flush())
    return deltas, fed, d


def sequences(tokenizer, rng: random.Random) -> list[list[int]]:
    """Encoded texts, random ids, and adversarial mixes: texts cut and spliced, special
    tokens and byte-fallback tokens (valid runs, truncated runs, lone continuation bytes)
    inserted, runs of space tokens."""
    vocab = len(tokenizer)
    specials = list(tokenizer.all_special_ids)
    byte_ids = sorted(byte_fallback_ids(tokenizer))
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    space = tokenizer.encode(" ", add_special_tokens=False) or [0]
    out = [list(e) for e in encoded]
    out.append([t for e in encoded for t in e])  # long: moves the window many times
    for _ in range(6):
        out.append([rng.randrange(vocab) for _ in range(rng.randint(1, 80))])
    for _ in range(10):
        seq: list[int] = []
        while len(seq) < rng.randint(5, 120):
            kind = rng.random()
            if kind < 0.4:
                e = rng.choice(encoded)
                i = rng.randrange(len(e))
                seq += e[i : i + rng.randint(1, 12)]
            elif kind < 0.55:
                seq.append(rng.choice(specials))
            elif kind < 0.7:
                seq += space * rng.randint(1, 3)
            elif kind < 0.85 and byte_ids:
                raw = rng.choice(["é", "中", "😀", "\u0301", "x"]).encode()
                if rng.random() < 0.4:
                    raw = raw[: rng.randint(1, len(raw))]  # truncated: invalid
                if rng.random() < 0.2:
                    raw = bytes([0x80 + rng.randrange(64)])  # lone continuation byte
                seq += [byte_ids[b] for b in raw]
            else:
                seq.append(rng.randrange(vocab))
        out.append(seq)
    return out


def naive_stop(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[str, int]:
    """The simplest correct stop rule: decode everything after each token; the first token
    whose complete text (no pending UTF-8 sequence, no open run of byte-fallback tokens: the
    last token that the decoder does not skip is no byte) holds a stop string ends the
    request there, cut before the earliest stop string. Returns (text, tokens fed)."""
    byte_ids = byte_fallback_ids(tokenizer)
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for n in range(1, len(ids) + 1):
        text = full_decode(tokenizer, ids[:n])
        shown = [t for t in ids[:n] if t not in special]
        if text.endswith("\ufffd") or (shown and shown[-1] in byte_ids):
            continue
        hits = [i for s in stop if (i := text.find(s)) >= 0]
        if hits:
            return text[: min(hits)], n
    text = full_decode(tokenizer, ids)
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(hits)] if hits else text), len(ids)


def check_tokenizer(tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    for ids in sequences(tokenizer, rng):
        want = full_decode(tokenizer, ids)
        deltas, _, d = stream(tokenizer, ids)
        assert "".join(deltas) == want, f"seed {seed}: ids {ids}"
        assert d.text == want
        # stop strings: substrings of the text (across tokens, multi-byte), and absent ones
        stops = [("\x00never",)]
        for _ in range(4):
            if len(want) > 1:
                i = rng.randrange(len(want) - 1)
                stops.append((want[i : i + rng.randint(1, 6)], "\x00other"))
        if len(want) > 4:
            stops.append((want[-2:], want[1:3]))  # two stops: the earlier one wins
        for stop in stops:
            if any(not s for s in stop):
                continue
            deltas, fed, d = stream(tokenizer, ids, stop)
            text, n = naive_stop(tokenizer, ids, stop)
            got = "".join(deltas)
            assert (got, fed) == (text, n), f"seed {seed}: stop {stop!r}, ids {ids}"
            assert d.stopped == any(s in full_decode(tokenizer, ids[:n]) for s in stop)
            # never ahead of the final text: no part of a stop string was ever sent
            sent = ""
            for delta in deltas:
                sent += delta
                assert text.startswith(sent)


def test_smollm2_deltas_equal_full_decode(smollm2, seed):
    check_tokenizer(smollm2, seed)


def test_llama_sentencepiece_deltas_equal_full_decode(llama_sp, seed):
    assert len(byte_fallback_ids(llama_sp)) == 256
    check_tokenizer(llama_sp, seed)


def test_sentencepiece_spacing_and_split_characters(llama_sp):
    """Leading '▁' handling at every window start, and a character split across byte tokens."""
    tok = llama_sp
    ids = tok.encode(" two  spaces, 中文 and 😀 at the start of a window", add_special_tokens=False)
    assert any(t in byte_fallback_ids(tok) for t in ids)  # byte fallback really fires
    for cut in range(len(ids)):
        deltas, _, _ = stream(tok, ids[cut:])
        assert "".join(deltas) == full_decode(tok, ids[cut:])
    emoji = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "😀".encode()]
    d = IncrementalDetokenizer(tok, ())
    assert [d.add(t) for t in emoji] == ["", "", "", ""]  # nothing before the run closes
    assert d.add(tok.convert_tokens_to_ids("a")) == "😀a"
    # a valid run that a later invalid byte turns into U+FFFD is never emitted early
    run = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in b"\xc3\xa9\xe4"]
    deltas, _, _ = stream(tok, run)
    assert "".join(deltas) == full_decode(tok, run) == "\ufffd" * 3


def test_window_stays_small(smollm2, llama_sp):
    """Work per token is O(1): the decoded window never grows with the output."""
    for tok in (smollm2, llama_sp):
        ids = [t for text in TEXTS * 8 for t in tok.encode(text, add_special_tokens=False)]
        d = IncrementalDetokenizer(tok, ("\x00",))
        widest = 0
        for t in ids:
            d.add(t)
            widest = max(widest, len(d.ids) - d._start)
        assert len(ids) > 500 and widest <= 2 * _WINDOW + 8, f"window reached {widest}"
