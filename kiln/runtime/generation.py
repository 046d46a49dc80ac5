"""Numpy building blocks of text generation: options, logits processing, token choice, stopping, streaming, chat.

The decode loop (engine + KV cache) sits on top of these. Each block follows what ``transformers``' ``generate``
does for the same options, so a kiln artifact and the PyTorch model pick the same tokens under greedy decoding:
repetition penalty always, then (only when sampling) temperature, top-k, top-p, in that order.
No torch and no transformers here: the runtime must stay light.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from kiln.errors import ArtifactError, InputError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # 0/None = off (transformers' generate() defaults to 50 when sampling; we do not)
    top_p: float | None = None  # None/1.0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop_strings, str):  # a lone string would otherwise be read as one stop per character
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        self.validate()

    def validate(self) -> None:
        def check(field: str, ok: bool, allowed: str):
            if not ok:
                value = getattr(self, field)
                raise InputError(f"Generation option {field}={value!r} is out of range: it must be {allowed}.")

        check("max_new_tokens", _integer(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1")
        check("temperature", _number(self.temperature) and self.temperature > 0,
              "a number > 0 (for greedy decoding set do_sample=False instead of temperature=0)")
        check("top_k", self.top_k is None or _integer(self.top_k) and self.top_k >= 0,
              "an integer >= 0 (0 or None turns it off)")
        check("top_p", self.top_p is None or _number(self.top_p) and 0 < self.top_p <= 1,
              "a number in (0, 1] (1.0 or None turns it off)")
        check("repetition_penalty", _number(self.repetition_penalty) and self.repetition_penalty > 0,
              "a number > 0 (1.0 turns it off)")
        check("eos_token_id", all(_integer(i) and i >= 0 for i in self.eos_ids),
              "a token id >= 0, a list of them, or None")
        check("stop_strings", all(isinstance(s, str) and s for s in self.stop_strings), "a tuple of non-empty strings")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:  # a typo such as "max_tokens" would otherwise be ignored silently
            raise InputError(f"Unknown generation option(s) {unknown}; the options are {sorted(known)}.")
        return cls(**d)

    def merge(self, **overrides) -> GenerationConfig:
        """A copy with ``overrides`` applied; ``None`` means "not given" (turn top_k off with 0, top_p with 1.0)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return type(self).from_dict({**dataclasses.asdict(self), **given})

    @classmethod
    def from_artifact(cls, directory: str | os.PathLike) -> GenerationConfig:
        """Defaults from the checkpoint's ``generation_config.json`` (as transformers does), or plain defaults.

        ``max_length`` (prompt + new tokens) is not read: kiln counts new tokens only."""
        path = Path(directory) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:  # RecursionError: nesting a hostile file made deep
            raise InputError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
        if not isinstance(raw, dict):
            raise InputError(f"{path} must hold a JSON object, found {type(raw).__name__}; fix or delete it.")
        keys = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                "eos_token_id", "pad_token_id", "bos_token_id")
        return cls.from_dict({k: raw[k] for k in keys if raw.get(k) is not None})

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- logits processors
# Each takes and returns (B, V) float32 scores, like transformers' LogitsProcessor.__call__(input_ids, scores).

def penalize_repetition(scores: np.ndarray, generated: np.ndarray, penalty: float,
                       ignore: np.ndarray | None = None) -> np.ndarray:
    """Divide positive and multiply negative scores of every token already in ``generated`` (prompt included).

    ``ignore`` (B,) is the number of leading positions per row not to count (left padding), transformers'
    ``prompt_ignore_length``. Ids outside the vocabulary are skipped: the model cannot produce them anyway."""
    B, V = scores.shape
    ids = np.minimum(generated, V)  # (B, N); V is the drop slot
    if ignore is not None:
        ids = np.where(np.arange(ids.shape[1])[None, :] < np.asarray(ignore)[:, None], V, ids)
    seen = np.zeros((B, V + 1), dtype=bool)
    seen[np.arange(B)[:, None], ids] = True
    penalized = np.where(scores < 0, scores * np.float32(penalty), scores / np.float32(penalty))
    return np.where(seen[:, :V], penalized, scores).astype(np.float32)


def scale_temperature(scores: np.ndarray, value: float) -> np.ndarray:
    return (scores / np.float32(value)).astype(np.float32)


def filter_top_k(scores: np.ndarray, k: int, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Keep the k highest scores; ties with the k-th are kept too (transformers compares with ``<``)."""
    k = min(max(k, min_tokens_to_keep), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k, None]  # (B, 1) the k-th largest
    return np.where(scores < kth, np.float32(-np.inf), scores)


def filter_top_p(scores: np.ndarray, p: float, min_tokens_to_keep: int = 1) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= p.

    As transformers: sort ascending, drop tokens whose cumulative probability is <= 1 - p, in float32."""
    order = np.argsort(scores, axis=-1, kind="stable")  # (B, V) ascending
    cumulative = np.cumsum(softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
    remove_sorted = cumulative <= np.float32(1 - p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def process_logits(logits: np.ndarray, generated: np.ndarray, config: GenerationConfig,
                   attention_mask: np.ndarray | None = None) -> np.ndarray:
    """(B, V) last-position logits -> processed scores, in the order of transformers' ``_get_logits_processor``.

    ``generated`` (B, N) holds prompt + new ids. ``attention_mask`` (B, N), when given, marks left padding: the
    positions before each row's first 1 are not penalized (transformers derives the same from the prompt's mask)."""
    scores = np.asarray(logits, dtype=np.float32)  # transformers casts logits to float32 before processing
    if config.repetition_penalty != 1.0:
        ignore = None if attention_mask is None else (np.asarray(attention_mask) != 0).argmax(axis=1)
        scores = penalize_repetition(scores, np.asarray(generated, dtype=np.int64), config.repetition_penalty, ignore)
    if not config.do_sample:  # the warpers below change no argmax, so greedy decoding skips them like transformers
        return scores
    if config.temperature != 1.0:
        scores = scale_temperature(scores, config.temperature)
    if config.top_k:
        scores = filter_top_k(scores, config.top_k)
    if config.top_p is not None and config.top_p < 1.0:
        scores = filter_top_p(scores, config.top_p)
    return scores


def select_next(scores: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """(B, V) processed scores -> (B,) int64 next ids: argmax, or one draw from softmax(scores) when sampling."""
    if not config.do_sample:
        return scores.argmax(axis=-1).astype(np.int64)
    # Inverse CDF in float64: a filtered (-inf) token has zero width and can never be drawn.
    cdf = np.cumsum(softmax(scores.astype(np.float64)), axis=-1)  # (B, V)
    u = rng.random((scores.shape[0], 1)) * cdf[:, -1:]  # (B, 1)
    drawn = (cdf <= u).sum(axis=-1)  # the first index whose cdf exceeds u
    # u can round up to the total; then take the last token with any probability (where the cdf first peaks)
    return np.minimum(drawn, cdf.argmax(axis=-1)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- streaming and stops

class StreamDecoder:
    """Incremental detokenization that only emits complete text.

    Decodes a window of tokens starting one emission back (so a SentencePiece word keeps its leading space, which a
    decode starting at that token would strip) and emits what the window adds beyond its prefix, once the text does
    not end in U+FFFD: a byte-level BPE token may hold only part of a UTF-8 character. The same offsets scheme as
    text-generation-inference and vLLM; the concatenation of all pieces plus ``flush()`` equals a full decode."""

    def __init__(self, tokenizer_decode: Callable[[list[int]], str]):
        self._decode = tokenizer_decode
        self._tokens: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this have been emitted

    def push(self, token_id: int) -> str:
        self._tokens.append(int(token_id))
        prefix_text, text = self._window()
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._tokens)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD); later pushes start afresh."""
        prefix_text, text = self._window()
        self._prefix = self._read = len(self._tokens)
        return text[len(prefix_text):]

    def _window(self) -> tuple[str, str]:
        return self._decode(self._tokens[self._prefix:self._read]), self._decode(self._tokens[self._prefix:])


class StopChecker:
    """Per-row finished state over the new tokens: EOS ids, stop strings and max_new_tokens.

    A stop string ends a row as soon as it appears in the decoded text of the new tokens, even when it ends inside
    the last token ("st" + "opper" stops "stop"): transformers' StopStringCriteria matches exactly the stop strings
    that overlap the newest token, and checks after every token, which comes to the same. Unlike transformers, text of
    the prompt does not count towards a match. ``finish_reason[b]`` is "eos", "stop", "length" or None."""

    def __init__(self, config: GenerationConfig, batch: int, decode: Callable[[list[int]], str] | None = None):
        if config.stop_strings and decode is None:
            raise InputError("stop_strings need the tokenizer's decode function: pass decode= to StopChecker.")
        self.config = config
        self.eos_ids = config.eos_ids
        self.done = np.zeros(batch, dtype=bool)
        self.finish_reason: list[str | None] = [None] * batch
        self.steps = 0
        self._streams = [StreamDecoder(decode) for _ in range(batch)] if config.stop_strings else []
        self._texts = [""] * len(self._streams)
        # transformers pads finished rows with pad_token_id, falling back to the first EOS id
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else (self.eos_ids or (None,))[0]

    def fill(self, tokens: np.ndarray) -> np.ndarray:
        """Replace the next tokens of rows that finished earlier by the pad id (call before ``update``)."""
        if self.pad_id is None:
            return tokens
        return np.where(self.done, np.int64(self.pad_id), tokens)

    def update(self, tokens: np.ndarray) -> np.ndarray:
        """Record one new token per row; returns the (B,) finished mask (finished rows stay finished)."""
        self.steps += 1
        was_done = self.done.copy()
        tokens = np.asarray(tokens).reshape(-1)
        self._finish(np.flatnonzero(~was_done & np.isin(tokens, self.eos_ids)), "eos")
        for b, stream in enumerate(self._streams):
            if was_done[b]:
                continue
            before = len(self._texts[b])
            self._texts[b] += stream.push(int(tokens[b]))
            # only a match that ends in the text added now is new: search from len(stop) - 1 characters before it
            if any(s in self._texts[b][max(0, before - len(s) + 1):] for s in self.config.stop_strings):
                self._finish([b], "stop")
        if self.steps >= self.config.max_new_tokens:
            self._finish(np.flatnonzero(~self.done), "length")
        return self.done.copy()

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def _finish(self, rows, reason: str) -> None:
        for b in rows:
            if not self.done[b]:
                self.done[b], self.finish_reason[b] = True, reason


# ---------------------------------------------------------------------------------------------- chat templates

def chat_template_from(directory: str | os.PathLike, name: str = "default") -> str | None:
    """The checkpoint's chat template, where transformers looks: ``chat_template.jinja`` (transformers >= 4.50 saves
    it there and prefers it), else ``tokenizer_config.json`` "chat_template" (a string, or a list of named templates
    of which ``name`` is picked). None when there is none."""
    directory = Path(directory)
    if name == "default" and (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "additional_chat_templates" / f"{name}.jinja").is_file():
        return (directory / "additional_chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, over-long numbers, hostile nesting
        raise ArtifactError(f"{path} is not valid JSON ({err}). Restore it from the checkpoint.") from err
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise ArtifactError(f"{path} 'chat_template' must be a string or a list of {{\"name\", \"template\"}} "
                                "strings. Restore it from the checkpoint.")
        named = {t["name"]: t["template"] for t in template}
        if name not in named:
            raise InputError(f"{path} has chat templates {sorted(named)} but none named {name!r}; pass one of those.")
        return named[name]
    if template is not None and not isinstance(template, str):
        raise ArtifactError(f"{path} 'chat_template' must be a string, found {type(template).__name__}. Restore it "
                            "from the checkpoint.")
    return template


def render_chat(messages: list[dict], template: str, *, add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **extra) -> str:
    """Render a conversation like transformers' ``apply_chat_template(tokenize=False)``.

    Templates come from the Hub and are untrusted code, hence the immutable sandbox; the environment (trim_blocks,
    lstrip_blocks, loop controls, ``tojson``, ``raise_exception``, ``strftime_now``) matches transformers' so the same
    template renders the same text. Keys whose value is None are dropped, as transformers does: templates test
    ``'key' in message``. ``extra`` reaches the template as variables (tools, documents, other special tokens)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {"tools": None, "documents": None, "bos_token": bos_token, "eos_token": eos_token, **extra}
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


@functools.lru_cache(maxsize=8)  # a pipeline renders every prompt with the same template
def _compile(template: str):
    return _environment().from_string(template)


def _environment():
    import jinja2  # imported on first use: only chat needs it
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates cannot set {name!r} on a namespace.")

    class Namespace(jinja2.utils.Namespace):
        # Underscore names could reach CPython internals from inside the sandbox (transformers blocks them too)
        def __init__(*args, **kwargs):  # jinja's signature trick, so that namespace(self=...) works
            for name in dict(*args[1:], **kwargs):
                check_name(name)
            jinja2.utils.Namespace.__init__(*args, **kwargs)

        def __setitem__(self, name, value):
            check_name(name)
            super().__setitem__(name, value)

    class Generation(jinja2.ext.Extension):
        # {% generation %} marks assistant text for transformers' assistant masks; rendering just keeps the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env
