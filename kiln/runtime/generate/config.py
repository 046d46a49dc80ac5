"""Generation options: the subset of transformers' ``GenerationConfig`` that kiln's decode loop implements.

Defaults come from the checkpoint's ``generation_config.json`` when there is one (as in transformers), overridden by
the options of a call; every value is checked once, here, with a message that names the option.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.errors import InputError
from kiln.files import read_json


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # 0/None = off (transformers' generate() defaults to 50 when sampling; we do not)
    top_p: float | None = None  # None/1.0 = off
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0 = off; n: no n-gram of the sequence (prompt included) occurs twice
    min_new_tokens: int = 0  # EOS is held back until this many new tokens
    num_beams: int = 1  # > 1: beam search (kiln.runtime.generate.beam)
    length_penalty: float = 1.0  # beam search: finished beams compete by score / new length ** length_penalty
    early_stopping: bool | str = False  # beam search: True (stop at num_beams finished), False (heuristic), "never"
    num_return_sequences: int = 1  # sequences per prompt: the best beams, or independent samples
    prompt_lookup_num_tokens: int | None = None  # prompt-lookup decoding: candidates copied from the text so far
    max_matching_ngram_size: int | None = None  # prompt lookup: the longest n-gram matched (transformers: 2)
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
        check("no_repeat_ngram_size", _integer(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
              "an integer >= 0 (0 turns it off)")
        check("min_new_tokens", _integer(self.min_new_tokens) and self.min_new_tokens >= 0, "an integer >= 0")
        check("num_beams", _integer(self.num_beams) and self.num_beams >= 1, "an integer >= 1 (1: no beam search)")
        check("length_penalty", _number(self.length_penalty) and np.isfinite(self.length_penalty), "a finite number")
        check("early_stopping", any(self.early_stopping is v for v in (True, False)) or self.early_stopping == "never",
              'True, False or "never"')
        check("num_return_sequences", _integer(self.num_return_sequences) and self.num_return_sequences >= 1,
              "an integer >= 1")
        if self.num_return_sequences > self.num_beams and not self.do_sample:
            raise InputError(f"num_return_sequences={self.num_return_sequences} with num_beams={self.num_beams}: "
                             "greedy decoding gives one sequence and a beam search at most num_beams; raise num_beams "
                             "or sample (do_sample=True).")
        check("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens is None
              or _integer(self.prompt_lookup_num_tokens) and self.prompt_lookup_num_tokens >= 1,
              "an integer >= 1, or None (off)")
        check("max_matching_ngram_size", self.max_matching_ngram_size is None
              or _integer(self.max_matching_ngram_size) and self.max_matching_ngram_size >= 1,
              "an integer >= 1, or None (2)")
        if self.prompt_lookup_num_tokens and (self.do_sample or self.num_beams > 1 or self.num_return_sequences > 1):
            raise InputError("prompt_lookup_num_tokens speeds up greedy decoding (its output is greedy's); it does "
                             "not go with do_sample, num_beams or num_return_sequences. Leave one of them out.")
        if self.num_beams > 1 and self.do_sample:
            raise InputError(f"do_sample=True with num_beams={self.num_beams}: kiln samples with one beam; pass "
                             "num_beams=1 to sample, or leave do_sample out to search beams.")
        if self.num_beams > 1 and self.stop_strings:
            raise InputError(f"stop_strings with num_beams={self.num_beams} are not supported: stop strings end "
                             "greedy or sampled generation; search beams without them, or use num_beams=1.")
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
        raw = read_json(path, "Fix or delete it.", error=InputError)
        keys = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                "no_repeat_ngram_size", "min_new_tokens", "num_beams", "length_penalty", "early_stopping",
                "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id")
        return cls.from_dict({k: raw[k] for k in keys if raw.get(k) is not None})

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
