"""Text generation in numpy over an engine: options (config.py), logits processors and token choice
(processors.py), stopping and streaming detokenization (stopping.py), chat templates (chat_template.py), and the
decode loop (loop.py): ``steps`` yields each step's tokens as they are chosen, ``generate`` collects them.

No torch and no transformers here: the runtime must stay light.
"""

from kiln.runtime.generate.chat_template import chat_template_from, render_chat
from kiln.runtime.generate.config import GenerationConfig
from kiln.runtime.generate.loop import DecoderSession, generate, position_ids, steps
from kiln.runtime.generate.processors import (ban_repeated_ngrams, filter_top_k, filter_top_p, hold_back_eos,
                                              penalize_repetition, process_logits, scale_temperature, select_next)
from kiln.runtime.generate.stopping import StopChecker, StreamDecoder

__all__ = ["DecoderSession", "GenerationConfig", "StopChecker", "StreamDecoder", "ban_repeated_ngrams",
           "chat_template_from", "filter_top_k", "filter_top_p", "hold_back_eos", "generate", "penalize_repetition", "position_ids", "process_logits",
           "render_chat", "scale_temperature", "select_next", "steps"]
