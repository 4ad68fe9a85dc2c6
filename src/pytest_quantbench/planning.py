"""Plan the work units of a run from pure inputs: the GGUF header, the selection rules, the qtypes.

Every xdist worker plans independently and must get the same list in the same order, so nothing
here reads run state (caches, time, randomness): units are sorted by (natural tensor order, qtype).
"""

from __future__ import annotations

from typing import Callable

from .config import ConfigError
from .session import QuantbenchSession, WorkUnit


def qtype_label(qtype) -> str:
    """The qtype as it appears in ids and CSV rows: the exact ggml name for a ggml type
    (``q4_k`` → ``q4_K``), the lower-case preset name for a preset (``Q4_K_M`` → ``q4_k_m``).

    qtype: a resolved :class:`pytest_quantbench.qtypes.QType`.
    """
    return qtype.name if qtype.kind == "type" else qtype.name.lower()


def plan_units(session: QuantbenchSession, warn: Callable[[str], None]) -> list[WorkUnit]:
    """The sorted work units of the run: one per (selected tensor, qtype).

    Args:
        session: gives the config and the baseline's GGUF header; warn: called with a message
            for each selection rule that matches no tensor.
    Raises:
        UnknownQTypeError, SelectionError, GGUFError, ConfigError (all ValueError): usage errors.
    """
    from .qtypes import parse_qtype_list
    from .selection import is_quantizable_tensor, natural_key, parse_rules, select_tensors

    config = session.config
    qtypes = sorted({qtype_label(q) for q in parse_qtype_list(list(config.qtypes))})
    header = session.model_header
    if header.n_ctx_train and config.kld_base is None and config.ctx > header.n_ctx_train:
        raise ConfigError(f"--quantbench-ctx {config.ctx} is larger than the model's training "
                          f"context ({header.n_ctx_train} tokens): use a smaller n_ctx")
    rules = []
    by_source: dict[str, list[str]] = {}
    for text, source in config.rule_lines():
        by_source.setdefault(source, []).append(text)
    for source, lines in by_source.items():
        rules.extend(parse_rules(lines, "--quantbench-tensors" if source == "CLI" else source))
    eligible = [t.name for t in header.tensors if is_quantizable_tensor(t.name, t.n_dims)]
    selection = select_tensors(eligible, rules)
    for rule in selection.unmatched_rules:
        warn(f"quantbench: selection rule {rule.describe()} matches no tensor of "
             f"{session.model_path.name}")
    tensors = sorted(selection.tensors, key=natural_key)
    return [WorkUnit(name=t, tensors=(t,), qtype=q) for t in tensors for q in qtypes]
