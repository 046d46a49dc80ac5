"""The OpenAI wire format, as pure functions: request fields checked and turned into pipeline options, results turned
into response bodies and server-sent-event chunks, errors into OpenAI's error body. No web framework here, so each
piece is tested on its own (``tests/serve/test_openai_format.py``) and the HTTP layer only wires them.
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import numpy as np


class APIError(Exception):
    """An answer other than 200: ``status``, OpenAI's error ``type``, the ``param`` at fault and a message saying what
    to change. Raised anywhere below the HTTP layer, which turns it into the body OpenAI clients parse."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _number(body: dict, name: str, low: float, high: float, default=None):
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad(f"'{name}' must be a number between {low} and {high}, got {value!r:.50}.", name)
    return value


def _integer(body: dict, name: str, low: int, high: int | None = None, default=None):
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        limit = f" and {high}" if high is not None else " or more"
        raise bad(f"'{name}' must be an integer between {low}{limit}, got {value!r:.50}.", name)
    return value


def embedding_inputs(body: dict, max_items: int) -> list[str]:
    """``input``: a string or a list of strings (token arrays are not taken: kiln tokenizes itself)."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad("'input' must be a non-empty string or list of strings.", "input")
    if len(texts) > max_items:
        raise bad(f"'input' has {len(texts)} items; this server takes at most {max_items} per request "
                  "(--max-batch-items). Split the request.", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad(f"'encoding_format' must be 'float' or 'base64', got {encoding!r:.50}.", "encoding_format")
    return texts


def embeddings_response(model: str, vectors: np.ndarray, tokens: int, encoding: str = "float") -> dict:
    def encode(v: np.ndarray):
        if encoding == "base64":  # little-endian float32, as OpenAI's clients decode it
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
        return [float(x) for x in v]

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def generation_options(body: dict, max_tokens_limit: int) -> dict:
    """OpenAI's sampling fields -> kiln's generation options (transformers' names)."""
    options = {}
    max_tokens = _integer(body, "max_completion_tokens", 1, max_tokens_limit)
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1, None, 16)
    if max_tokens > max_tokens_limit:
        raise bad(f"'max_tokens' is {max_tokens}; this server generates at most {max_tokens_limit} tokens per "
                  "request (--max-tokens).", "max_tokens")
    options["max_new_tokens"] = max_tokens
    temperature = _number(body, "temperature", 0, 2, 1.0)
    top_p = _number(body, "top_p", 0, 1, 1.0)
    if temperature == 0 or top_p == 0:
        options["do_sample"] = False  # OpenAI's temperature 0: the most likely tokens
    else:
        options.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    seed = _integer(body, "seed", 0, 2**63 - 1)
    if seed is not None:
        options["seed"] = seed
    n = _integer(body, "n", 1, 16, 1)
    if n > 1:
        if not options["do_sample"]:
            raise bad("'n' > 1 with temperature 0 would return n identical completions; sample (temperature > 0) "
                      "or ask for one.", "n")
        options["num_return_sequences"] = n
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not 0 < len(stop) <= 4 or not all(isinstance(s, str) and s for s in stop):
            raise bad("'stop' must be a non-empty string or a list of up to 4 of them.", "stop")
        options["stop_strings"] = tuple(stop)
    for ignored in ("logprobs", "logit_bias", "tools", "functions", "response_format"):
        if body.get(ignored) not in (None, False, {}, []):
            raise bad(f"'{ignored}' is not supported by kiln's server.", ignored)
    return options


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """OpenAI returns the text before the first stop sequence, without it; (text, whether one was found)."""
    found = [i for i in (text.find(s) for s in stops or ()) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {'role', 'content'} objects.", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}] needs a 'role' of system, user, assistant or developer.", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported.", "messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string.", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def prompt_text(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string (one prompt per request).", "prompt")
    return prompt


def _ids(kind: str) -> tuple[str, int]:
    return f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())


def completion_response(model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int,
                        chat: bool) -> dict:
    """``choices``: (text, finish_reason) per choice."""
    rid, created = _ids("chatcmpl" if chat else "cmpl")
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None} for i, (text, reason) in enumerate(choices)]
    else:
        items = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                 for i, (text, reason) in enumerate(choices)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": items,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class Stream:
    """Server-sent events of one streamed completion: ``chunk(text)`` per piece, ``end(reason, usage)``, then
    ``done()``, OpenAI's ``data: [DONE]``."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id, self.created = _ids("chatcmpl" if chat else "cmpl")
        self.started = False

    def _event(self, choice: dict, usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(self, text: str) -> str:
        if self.chat:
            delta = {"content": text} if self.started else {"role": "assistant", "content": text}
            self.started = True
            return self._event({"index": 0, "delta": delta, "finish_reason": None, "logprobs": None})
        return self._event({"index": 0, "text": text, "finish_reason": None, "logprobs": None})

    def end(self, reason: str, usage: dict | None = None) -> str:
        choice = {"index": 0, "delta": {}, "finish_reason": reason, "logprobs": None} if self.chat else \
            {"index": 0, "text": "", "finish_reason": reason, "logprobs": None}
        return self._event(choice, usage)

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"

    @staticmethod
    def error(err: APIError) -> str:
        return f"data: {json.dumps(err.body())}\n\n"


def models_response(models: dict) -> dict:
    """``models``: name -> {"task", "created"}."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": info.get("created", 0),
                                        "owned_by": "kiln", "task": info["task"]} for name, info in models.items()]}
