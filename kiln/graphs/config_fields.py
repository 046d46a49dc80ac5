"""config.json fields that every encoder family reads the same way: labels, problem type, sizes, epsilons.

Each check raises a ConfigError naming the field, so a corrupt or hand-edited config says what to fix.
"""

from __future__ import annotations

from kiln.errors import ConfigError

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def read_id2label(raw: dict, example: str = "NEG") -> dict[int, str] | None:
    """config.json's ``id2label`` (JSON keys are strings), else ``num_labels`` named LABEL_i as transformers names
    them, else None (the config dataclass keeps its default)."""
    if raw.get("id2label") is not None:
        try:
            return {int(k): str(v) for k, v in raw["id2label"].items()}
        except (AttributeError, TypeError, ValueError) as err:
            raise ConfigError(f"config.json 'id2label' must map label ids to names, e.g. {{\"0\": \"{example}\"}}: "
                              f"{err}") from err
    if raw.get("num_labels") is not None:
        num_labels = raw["num_labels"]
        # Capped at 2**20: the labels are materialised here, before any weight shows what the head really holds.
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or not 0 < num_labels <= 1 << 20:
            raise ConfigError(f"config.json 'num_labels' must be a positive integer, got {num_labels!r}.")
        return {i: f"LABEL_{i}" for i in range(num_labels)}
    return None


def check_sizes(config, names: tuple[str, ...], least: int = 1) -> None:
    """Each field an int in [least, 2**24]: a larger one means a corrupt file, not a model."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            what = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise ConfigError(f"config.json '{name}' must be {what}, got {value!r}.")
        if value > 1 << 24:
            raise ConfigError(f"config.json '{name}' = {value} is implausibly large; the file looks corrupt.")


def check_heads(hidden_size: int, heads: int) -> None:
    if hidden_size % heads:
        raise ConfigError(f"config.json 'hidden_size' ({hidden_size}) must be divisible by 'num_attention_heads' "
                          f"({heads}).")


def check_choice(config, name: str, choices: tuple) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"config.json '{name}' {value!r} is not supported; use one of {choices}.")


def check_problem_type(problem_type) -> None:
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise ConfigError(f"config.json 'problem_type' {problem_type!r} must be one of {PROBLEM_TYPES}.")


def check_eps(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"config.json '{name}' must be a small positive number, got {value!r}.")


def check_bool(config, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"config.json '{name}' must be true or false, got {getattr(config, name)!r}.")
