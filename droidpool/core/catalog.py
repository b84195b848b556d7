"""Which models exist and what a client's model name means: droid's ids, short forms, BYOK names, aliases."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from droidpool import errors


@dataclass(frozen=True)
class Listed:
    """A model as ``/v1/models`` shows it: droid's entry, or an alias pointing at one."""

    id: str
    info: Mapping[str, Any]
    alias_of: str | None = None


class Catalog:
    """Resolves client model names to droid's model ids.

    ``listed`` returns droid's latest ``list_models`` answer (empty until a worker answered).
    ``configured`` are ids from ``pool.models``; ``byok_names`` maps the BYOK names droid accepts
    (``custom:<model>``) to their display names; ``aliases`` maps client names, exact or glob,
    to a droid name, checked exact first, then each glob in order.
    """

    def __init__(
        self,
        listed: Callable[[], Sequence[Mapping[str, Any]]],
        *,
        configured: Sequence[str] = (),
        byok_names: Mapping[str, str] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._listed = listed
        self.configured = tuple(configured)
        self.byok_names = dict(byok_names or {})
        self.aliases = dict(aliases or {})

    def models(self) -> list[Mapping[str, Any]]:
        """droid's models that are not disabled, plus the configured ids."""
        seen: dict[str, Mapping[str, Any]] = {}
        for model in self._listed():
            if isinstance(model, Mapping) and isinstance(model.get("id"), str) and not model.get("disabled"):
                seen[model["id"]] = model
        for model_id in self.configured:
            seen.setdefault(model_id, {"id": model_id})
        return list(seen.values())

    def listing(self) -> list[Listed]:
        """Every model a client may name: droid's, then each exact alias."""
        models = self.models()
        out = [Listed(m["id"], m) for m in models]
        known = {m["id"]: m for m in models}
        for name, target in self.aliases.items():
            if _is_glob(name) or name in known:
                continue
            try:
                model_id = self._droid_id(target, known)
            except errors.ModelNotFound:
                continue
            out.append(Listed(name, known.get(model_id, {"id": model_id}), alias_of=model_id))
        return out

    def alias(self, name: str) -> str:
        """``name`` after the alias table (unchanged when no alias matches)."""
        return lookup(self.aliases, name, name)

    def info(self, model_id: str) -> Mapping[str, Any]:
        """droid's entry for ``model_id`` (``{"id": model_id}`` when droid listed none)."""
        for model in self.models():
            if model["id"] == model_id:
                return model
        return {"id": model_id}

    def sees_images(self, model_id: str) -> bool:
        """Whether droid sends the model images (its entry lacks ``noImageSupport``)."""
        return not self.info(model_id).get("noImageSupport")

    def resolve(self, name: str, reasoning_effort: str | None = None) -> str:
        """droid's id for a client's model name, or ModelNotFound; checks the reasoning effort."""
        return self.resolve_with_effort(name, reasoning_effort)[0]

    def resolve_with_effort(
        self, name: str, reasoning_effort: str | None = None, *, exact: bool = True
    ) -> tuple[str, str | None]:
        """droid's id for a client's model name, and the effort to ask droid for.

        An ``exact`` effort the model does not support is a 400; an inexact one (derived from
        a thinking budget) becomes the nearest effort the model supports, or none."""
        known = {m["id"]: m for m in self.models()}
        target = self.alias(name)
        if not known:
            return target, reasoning_effort  # nothing known yet (no worker has answered): droid will judge
        model_id = self._droid_id(target, known, asked=name)
        supported = known[model_id].get("supportedReasoningEfforts") if model_id in known else None
        if reasoning_effort and isinstance(supported, list) and reasoning_effort not in supported:
            if not exact:
                return model_id, nearest_effort(reasoning_effort, [str(e) for e in supported])
            raise errors.InvalidRequest(
                f"{name} supports reasoning effort {', '.join(map(str, supported))}; "
                f"got {reasoning_effort!r}.",
                param="reasoning_effort",
            )
        return model_id, reasoning_effort

    def _droid_id(self, target: str, known: Mapping[str, Mapping[str, Any]], asked: str | None = None) -> str:
        if target in known:
            return target
        short = {re.sub(r"-\d+$", "", model_id): model_id for model_id in known}
        by_display = {m.get("displayName"): m["id"] for m in known.values() if m.get("isCustom")}
        for byok, display in self.byok_names.items():
            if display in by_display:
                short.setdefault(byok, by_display[display])
        if target in short:
            return short[target]
        shown = asked if asked is not None else target
        via = f" (alias of {target!r})" if asked is not None and asked != target else ""
        raise errors.ModelNotFound(
            f"The model {shown!r}{via} does not exist or droid cannot use it; "
            f"available: {', '.join(sorted(known))}.",
            param="model",
        )


# droid's efforts from least to most thinking; "dynamic" lets the model decide.
EFFORT_ORDER = ("none", "off", "minimal", "low", "medium", "high", "xhigh", "max")


def nearest_effort(wanted: str, supported: Sequence[str]) -> str | None:
    """The supported effort closest to ``wanted`` (ties go to the smaller one); None if none fits."""
    ranked = [e for e in supported if e in EFFORT_ORDER]
    if wanted not in EFFORT_ORDER or not ranked:
        return "dynamic" if "dynamic" in supported else None
    rank = EFFORT_ORDER.index(wanted)
    return min(ranked, key=lambda e: (abs(EFFORT_ORDER.index(e) - rank), EFFORT_ORDER.index(e)))


V = TypeVar("V")
W = TypeVar("W")


def lookup(table: Mapping[str, V], name: str, default: W) -> V | W:
    """``table[name]``, else the value of the first glob key matching ``name``, else ``default``."""
    if name in table:
        return table[name]
    for pattern, value in table.items():
        if _is_glob(pattern) and fnmatch.fnmatchcase(name, pattern):
            return value
    return default


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")
