"""Plan the work units of a run from pure inputs: the GGUF header, the selection rules, the groups
and the qtypes.

Every xdist worker plans independently and must get the same list in the same order, so nothing
here reads run state (caches, time, randomness): groups come first (argument order), then
tensors in natural order, each with its qtypes sorted.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import ConfigError
from .measure import WorkUnit
from .qtypes import qtype_label
from .session import QuantbenchSession


def plan_units(session: QuantbenchSession, warn: Callable[[str], None]) -> list[WorkUnit]:
    """The sorted work units of the run: one per (selected tensor, qtype) and per (group, qtype).

    A tensor that belongs to a ``--quantbench-group-tensors`` group is measured only through
    its group (docs/suite-formats.md#groups); ``--quantbench-groups-only`` drops the single-tensor
    units. Sets ``session.groups`` (the :class:`~pytest_quantbench.selection.Group` list).

    Args:
        session: gives the config and the baseline's GGUF header; warn: called with a message
            for each selection rule or group that matches no tensor.
    Raises:
        UnknownQTypeError, SelectionError, GGUFError, ConfigError (all ValueError): usage errors.
    """
    from .qtypes import parse_qtype_list
    from .selection import is_quantizable_tensor, natural_key, select_groups

    config = session.config
    # no qtypes: no items, only the quantbench fixture measures
    qtypes = sorted(
        {qtype_label(q) for q in parse_qtype_list(list(config.qtypes))} if config.qtypes else ()
    )
    header = session.model_header
    if header.n_ctx_train and config.kld_base is None and config.ctx > header.n_ctx_train:
        raise ConfigError(
            f"--quantbench-ctx {config.ctx} is larger than the model's training "
            f"context ({header.n_ctx_train} tokens): use a smaller n_ctx"
        )
    eligible = [t.name for t in header.tensors if is_quantizable_tensor(t.name, t.n_dims)]
    groups = select_groups(config.group_tensors, eligible, warn=warn)
    if config.groups_only and not groups and config.qtypes:
        raise ConfigError(
            "--quantbench-groups-only: no group has a member; give "
            "--quantbench-group-tensors REGEX[,REGEX] (e.g. '.*' for the whole model)"
        )
    session.groups = groups
    grouped = {t for g in groups for t in g.members}
    tensors = (
        []
        if config.groups_only
        else [t for t in _selected_tensors(session, eligible, warn) if t not in grouped]
    )
    units = [WorkUnit(name=g.name, tensors=g.members, qtype=q) for g in groups for q in qtypes]
    units += [
        WorkUnit(name=t, tensors=(t,), qtype=q)
        for t in sorted(tensors, key=natural_key)
        for q in qtypes
    ]
    return units + _whole_units(session, warn)


def _whole_units(session: QuantbenchSession, warn: Callable[[str], None]) -> list[WorkUnit]:
    """The ``variant[<stem>]`` and ``recipe[<stem>]`` units (variants.whole_units), checked
    against the baseline now; sets ``session.whole_paths`` ((name, stem) → file)."""
    from . import inputs
    from .variants import whole_units

    config = session.config
    session.whole_paths = {}
    if not config.variant and not config.recipe:
        return []
    units = whole_units(
        config.variant,
        config.recipe,
        session.model_header,
        lambda p: inputs.sha256_file(p, session.cache_dir),
        warn,
    )
    given = [*config.variant, *config.recipe]
    session.whole_paths = {(u.name, u.qtype): p for u, p in zip(units, given, strict=True)}
    return units


def _selected_tensors(
    session: QuantbenchSession, eligible: list[str], warn: Callable[[str], None]
) -> tuple[str, ...]:
    """The tensors the selection rules (CLI, YAML/ini, tensors file, or the default) select."""
    from .selection import Rule, parse_rules, select_tensors

    rules: list[Rule] = []
    by_source: dict[str, list[str]] = {}
    for text, source in session.config.rule_lines():
        by_source.setdefault(source, []).append(text)
    for source, lines in by_source.items():
        rules.extend(parse_rules(lines, "--quantbench-tensors" if source == "CLI" else source))
    selection = select_tensors(eligible, rules)
    for rule in selection.unmatched_rules:
        warn(
            f"quantbench: selection rule {rule.describe()} matches no tensor of "
            f"{session.model_path.name}"
        )
    return selection.tensors
