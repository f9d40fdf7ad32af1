"""``tokentrack prices import FILE`` and ``tokentrack prices list``: model prices from LiteLLM.

``import`` reads LiteLLM's ``model_prices_and_context_window.json`` (the ecosystem's price
map: one object per model name) and adds each model's price with
``tokentrack.set_model_price(model, prices)``, all in one transaction, at the transaction's
``now()``. LiteLLM gives costs in currency units per token; tokentrack prices are micros
(10^-6 of the unit) per million tokens, so each cost is multiplied by 10^12, exactly: the
file is parsed with :class:`~decimal.Decimal` numbers (never through ``float``, where
``2.5e-06 * 1e12`` is not 2500000) and the prices go to SQL as JSON number text.

=================================== ===============
LiteLLM key                         tokentrack class
=================================== ===============
``input_cost_per_token``            ``input``
``output_cost_per_token``           ``output``
``cache_read_input_token_cost``     ``cached_input``
``cache_creation_input_token_cost`` ``cache_write``
``output_cost_per_reasoning_token`` ``reasoning``
=================================== ===============

An optional key that is absent stays absent, so the SQL applies its defaults (cached input
and cache write at the input price, reasoning at the output price). Every other key is
ignored, the tiered ones (``input_cost_per_token_above_200k_tokens``...) and the service tiers
(``..._batches``, ``..._priority``, ``..._flex``) included: tokentrack has one price per
class. Entries are skipped, each with its reason (:class:`Skipped`): ``sample_spec`` (the
format's own description), an entry that is not a JSON object, one without both an input and
an output cost per token (image generation, per-second audio...), one with a cost that is
negative or not a finite number.

Importing the same file again adds nothing: ``set_model_price`` answers ``"duplicate": true``
when the price in effect for that model already has exactly these prices. A dry run does the
same work in a transaction that is rolled back, so it reports exactly what an import would
add. ``list`` shows the price in effect now for each model name or pattern.
"""

from __future__ import annotations

import decimal
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import asyncpg

from tokentrack_client.answers import (
    get_bool,
    get_datetime,
    get_decimal,
    get_int,
    get_str,
    read_answer,
)
from tokentrack_client.connection import describe_target, pg_error
from tokentrack_client.errors import TokenTrackError
from tokentrack_client.ops._common import OpsError, connected, render_table, require_installed

__all__ = [
    "LITELLM_KEYS",
    "PRICE_CLASSES",
    "ImportResult",
    "ModelPrice",
    "PriceChange",
    "PriceEntry",
    "PriceFile",
    "PriceList",
    "Skipped",
    "dumps",
    "glob_matches",
    "import_prices",
    "list_prices",
    "parse_litellm",
    "read_litellm",
    "to_micros",
]

PRICE_CLASSES: Final = ("input", "cached_input", "cache_write", "output", "reasoning")
"""tokentrack's price classes, in the order the commands print them."""

LITELLM_KEYS: Final[Mapping[str, str]] = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "output_cost_per_reasoning_token": "reasoning",
}
"""The LiteLLM cost keys that ``import`` reads, and the tokentrack class of each."""

SAMPLE_SPEC: Final = "sample_spec"
"""The entry of LiteLLM's file that describes the format (its values are placeholders)."""

SCALE: Final = 12
"""Units per token to micros per million tokens: x 10^6 micros per unit x 10^6 tokens."""

MAX_PRICE: Final = Decimal(10**12)
"""The dearest price ``set_model_price`` takes (constraint ``model_prices_bounded``): 10^12
micros per million tokens, one currency unit per token."""

MAX_MODEL_LENGTH: Final = 200
"""The longest model name ``set_model_price`` takes (constraint ``model_prices_model_valid``)."""

# Exact arithmetic: a result that would need rounding raises (decimal.Inexact) instead.
_EXACT: Final = decimal.Context(
    prec=1000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[decimal.Inexact]
)


# --------------------------------------------------------------------------------------------
# The file: parsing and conversion, no database
# --------------------------------------------------------------------------------------------


def to_micros(cost_per_token: Decimal | int) -> Decimal:
    """A LiteLLM cost (currency units per token) as micros per million tokens, exactly, in
    canonical form: an integral value has exponent 0 (``2500000``, not ``2.5E+6``), another
    one no trailing zeros."""
    micros = _EXACT.scaleb(Decimal(cost_per_token), SCALE)
    if micros == 0:
        return Decimal(0)  # also -0
    if micros == micros.to_integral_value(context=_EXACT):
        return micros.quantize(Decimal(1), context=_EXACT)
    return micros.normalize(context=_EXACT)


def micros_text(value: Decimal) -> str:
    """``value`` as JSON number text without an exponent (what SQL receives)."""
    return format(value, "f")


@dataclass(frozen=True)
class PriceEntry:
    """One model's price from the file: ``prices`` maps the classes the file gives (``input``
    and ``output`` always) to micros per million tokens."""

    model: str
    prices: Mapping[str, Decimal]

    def as_json_text(self) -> str:
        """``{"input": 2500000, ...}``: the ``p_prices`` of ``set_model_price``, exactly."""
        return (
            "{"
            + ", ".join(
                f"{json.dumps(k)}: {micros_text(self.prices[k])}"
                for k in PRICE_CLASSES
                if k in self.prices
            )
            + "}"
        )


SKIP_REASONS: Final[Mapping[str, str]] = {
    "sample_spec": "the format's description, not a model",
    "not_an_object": "not a JSON object",
    "not_priced_per_token": "without both an input and an output cost per token",
    "invalid_name": "with a name tokentrack refuses",
    "invalid_cost": "with a cost that is negative, not a number, or above 1 per token",
}
"""Each :attr:`Skipped.reason` and how the summary line names it."""


@dataclass(frozen=True)
class Skipped:
    """An entry of the file that was not imported: ``reason`` is a key of
    :data:`SKIP_REASONS`, ``detail`` says what exactly."""

    model: str
    reason: str
    detail: str

    def as_json(self) -> dict[str, str]:
        """``{"model", "reason", "detail"}``."""
        return {"model": self.model, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class PriceFile:
    """What :func:`parse_litellm` read: the prices to import, in the file's order, the
    entries skipped, and how many entries the filters left out."""

    entries: tuple[PriceEntry, ...]
    skipped: tuple[Skipped, ...]
    filtered_out: int


def glob_matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern``, where ``*`` matches any run of characters and
    every other character only itself (as in tokentrack's price patterns)."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name, flags=re.DOTALL) is not None


def _cost(value: object) -> Decimal | str:
    """``value`` as a non-negative micros price, or why it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return f"is not a number: {json.dumps(value, default=str)}"
    if isinstance(value, Decimal) and not value.is_finite():
        return f"is not a finite number: {value}"
    text = str(value) if isinstance(value, int) else format(value, "f")
    if value < 0:
        return f"is negative: {text}"
    try:
        micros = to_micros(value)
    except decimal.Inexact:  # a thousand significant digits: not a price
        return f"is not a price: {text[:40]}..."
    if micros > MAX_PRICE:
        return f"is above 1 per token (tokentrack's bound): {text}"
    return micros


def _entry(model: str, spec: object) -> PriceEntry | Skipped:
    if model == SAMPLE_SPEC:
        return Skipped(model, "sample_spec", "LiteLLM's description of the format")
    if not isinstance(spec, dict):
        return Skipped(model, "not_an_object", f"a JSON {type(spec).__name__}, not an object")
    if not model.strip(" ") or len(model) > MAX_MODEL_LENGTH or "\x00" in model:
        return Skipped(
            model, "invalid_name", f"blank, over {MAX_MODEL_LENGTH} characters, or with NUL"
        )
    missing = [k for k in ("input_cost_per_token", "output_cost_per_token") if k not in spec]
    if missing:
        return Skipped(model, "not_priced_per_token", f"no {' and no '.join(missing)}")
    prices: dict[str, Decimal] = {}
    for key, price_class in LITELLM_KEYS.items():
        if key not in spec:
            continue
        micros = _cost(spec[key])
        if isinstance(micros, str):
            return Skipped(model, "invalid_cost", f"{key} {micros}")
        prices[price_class] = micros
    return PriceEntry(model, prices)


def _provider(spec: object) -> object:
    return spec.get("litellm_provider") if isinstance(spec, dict) else None


def parse_litellm(
    text: str | bytes, *, provider: str | None = None, model: str | None = None
) -> PriceFile:
    """Read a ``model_prices_and_context_window.json`` document. ``provider`` keeps only the
    entries whose ``litellm_provider`` is that name, ``model`` only the model names that match
    that glob (:func:`glob_matches`). ValueError when the text is not a JSON object."""
    try:
        document = json.loads(text, parse_float=Decimal, parse_constant=Decimal)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"not a JSON object of models but a JSON {type(document).__name__}")
    entries: list[PriceEntry] = []
    skipped: list[Skipped] = []
    filtered_out = 0
    for name, spec in document.items():
        if (provider is not None and _provider(spec) != provider) or (
            model is not None and not glob_matches(model, name)
        ):
            filtered_out += 1
            continue
        read = _entry(name, spec)
        if isinstance(read, PriceEntry):
            entries.append(read)
        else:
            skipped.append(read)
    return PriceFile(tuple(entries), tuple(skipped), filtered_out)


def read_litellm(path: Path, *, provider: str | None = None, model: str | None = None) -> PriceFile:
    """:func:`parse_litellm` of the file at ``path``; OSError or ValueError as it raises."""
    return parse_litellm(path.read_bytes(), provider=provider, model=model)


# --------------------------------------------------------------------------------------------
# The database: set_model_price in one transaction, and the prices in effect
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPrice:
    """A row of ``tokentrack.model_prices``: ``prices`` maps each of :data:`PRICE_CLASSES` to
    micros per million tokens. ``price_id`` is None for the new prices of a dry run (the rows
    were rolled back)."""

    model: str
    price_id: int | None
    effective_from: datetime
    prices: Mapping[str, Decimal]

    def as_json(self) -> dict[str, Any]:
        """``{"model", "price_id", "effective_from", "prices": {CLASS: micros}}``."""
        return {
            "model": self.model,
            "price_id": self.price_id,
            "effective_from": self.effective_from.isoformat(),
            "prices": {k: self.prices[k] for k in PRICE_CLASSES},
        }


@dataclass(frozen=True)
class PriceChange:
    """A price that ``import`` added: ``old`` is the price it replaced for that exact model
    name (None: the model had none in effect)."""

    old: ModelPrice | None
    new: ModelPrice

    def render(self) -> str:
        """``new MODEL: input 2500000, ...`` or ``changed MODEL: input 2500000 -> 3000000``
        (only the classes whose price changed)."""
        new = self.new.prices
        if self.old is None:
            listed = ", ".join(f"{k} {micros_text(new[k])}" for k in PRICE_CLASSES)
            return f"new {self.new.model}: {listed}"
        old = self.old.prices
        changed = ", ".join(
            f"{k} {micros_text(old[k])} -> {micros_text(new[k])}"
            for k in PRICE_CLASSES
            if old[k] != new[k]
        )
        return f"changed {self.new.model}: {changed}"

    def as_json(self) -> dict[str, Any]:
        """``{"model", "old", "new"}`` (``old`` null for a new model)."""
        return {
            "model": self.new.model,
            "old": None if self.old is None else self.old.as_json(),
            "new": self.new.as_json(),
        }


_ANOMALIES: Final = frozenset({"not_an_object", "invalid_name", "invalid_cost"})
"""Skip reasons that point at a problem in the file: the human output names each entry."""


@dataclass(frozen=True)
class ImportResult:
    """What ``tokentrack prices import`` did (or, with ``dry_run``, would do): the prices it
    added, how many were already in effect (``unchanged``), the entries it skipped and how
    many the filters left out."""

    file: str
    dry_run: bool
    added: tuple[PriceChange, ...]
    unchanged: int
    skipped: tuple[Skipped, ...]
    filtered_out: int

    def as_json(self) -> dict[str, Any]:
        """The document of ``tokentrack prices import --json`` (exact numbers: print it with
        :func:`dumps`)."""
        return {
            "file": self.file,
            "dry_run": self.dry_run,
            "written": not self.dry_run,
            "added": len(self.added),
            "unchanged": self.unchanged,
            "skipped": len(self.skipped),
            "filtered_out": self.filtered_out,
            "changes": [c.as_json() for c in self.added],
            "skipped_entries": [s.as_json() for s in self.skipped],
        }

    def render(self) -> str:
        """One line per added price, one per skipped entry that points at a problem in the
        file, then the summary line."""
        lines = [c.render() for c in self.added]
        lines += [f"skipped {s.model}: {s.detail}" for s in self.skipped if s.reason in _ANOMALIES]
        changed = sum(1 for c in self.added if c.old is not None)
        added = f"{len(self.added)} added ({changed} changed, {len(self.added) - changed} new)"
        reasons = Counter(s.reason for s in self.skipped)
        skipped = f"{len(self.skipped)} skipped" + (
            " (" + "; ".join(f"{n} {SKIP_REASONS[r]}" for r, n in sorted(reasons.items())) + ")"
            if reasons
            else ""
        )
        figures = f"{self.unchanged} unchanged, {skipped}"
        if self.filtered_out:
            figures += f", {self.filtered_out} left out by the filters"
        if self.dry_run:
            summary = f"dry run: nothing written; would have {added}, {figures}"
        else:
            summary = f"{added}, {figures}"
        lines.append(f"prices import {self.file}: {summary} (micros per million tokens)")
        return "\n".join(lines)


@dataclass(frozen=True)
class PriceList:
    """The prices in effect now, one per model name or pattern, by name."""

    prices: tuple[ModelPrice, ...]

    def as_json(self) -> dict[str, Any]:
        """The document of ``tokentrack prices list --json`` (print it with :func:`dumps`)."""
        return {"prices": [p.as_json() for p in self.prices]}

    def render(self) -> str:
        """A table (micros per million tokens) and a count."""
        rows = [
            [
                p.model,
                *(micros_text(p.prices[k]) for k in PRICE_CLASSES),
                p.effective_from.isoformat(timespec="seconds"),
            ]
            for p in self.prices
        ]
        table = render_table(["MODEL", *(k.upper() for k in PRICE_CLASSES), "EFFECTIVE FROM"], rows)
        count = f"{len(self.prices)} price(s) in effect, in micros per million tokens"
        return f"{table}\n{count}" if self.prices else "no price in effect"


def dumps(document: object, indent: int = 2, _level: int = 0) -> str:
    """``document`` as JSON text, as ``json.dumps(document, indent=2)`` would print it, with
    every :class:`~decimal.Decimal` as its exact number text (``json`` has no such option)."""
    if isinstance(document, Decimal):
        return micros_text(document)
    pad, inner = " " * indent * _level, " " * indent * (_level + 1)
    if isinstance(document, Mapping):
        if not document:
            return "{}"
        items = [
            f"{inner}{json.dumps(str(k))}: {dumps(v, indent, _level + 1)}"
            for k, v in document.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(document, list | tuple):
        if not document:
            return "[]"
        items = [f"{inner}{dumps(v, indent, _level + 1)}" for v in document]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(document)


# The price in effect for each exact model name: what set_model_price compares with.
_IN_EFFECT: Final = """
SELECT DISTINCT ON (mp.model)
       mp.id, mp.model, mp.effective_from,
       mp.input, mp.cached_input, mp.cache_write, mp.output, mp.reasoning
FROM tokentrack.model_prices AS mp
WHERE ($1::text[] IS NULL OR mp.model = ANY ($1::text[]))
  AND mp.effective_from <= pg_catalog.clock_timestamp()
ORDER BY mp.model, mp.effective_from DESC
"""

# One statement for the whole file: one round trip, answers in the file's order.
_SET_PRICES: Final = """
SELECT tokentrack.set_model_price(e.price ->> 'model', e.price -> 'prices')::text
FROM pg_catalog.jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e (price, ord)
ORDER BY e.ord
"""


def _row_price(row: asyncpg.Record) -> ModelPrice:
    return ModelPrice(
        model=str(row["model"]),
        price_id=int(row["id"]),
        effective_from=row["effective_from"],
        prices={k: Decimal(row[k]) for k in PRICE_CLASSES},
    )


def _answer_price(raw: object, *, dry_run: bool) -> tuple[bool, ModelPrice]:
    """Whether ``set_model_price`` answered duplicate, and the price it answered."""
    try:
        answer = read_answer("set_model_price", raw, decimals=True)
        prices = answer.get("prices")
        if not isinstance(prices, Mapping):
            raise OpsError(f"set_model_price: the answer has no prices: {raw!r}")
        price = ModelPrice(
            model=get_str(answer, "model"),
            price_id=None if dry_run else get_int(answer, "price_id"),
            effective_from=get_datetime(answer, "effective_from"),
            prices={k: get_decimal(prices, k) for k in PRICE_CLASSES},
        )
        return get_bool(answer, "duplicate"), price
    except TokenTrackError as exc:
        raise OpsError(f"set_model_price: {exc}") from exc


async def _set_prices(
    conn: asyncpg.Connection, entries: Sequence[PriceEntry], *, dry_run: bool
) -> tuple[list[PriceChange], int]:
    """Call set_model_price for every entry, in the caller's transaction."""
    # set_model_price locks model_prices IN EXCLUSIVE MODE at its first call; taking the lock
    # before reading the prices in effect makes the "old" prices the ones it replaced, even
    # while another import runs.
    await conn.execute("LOCK TABLE tokentrack.model_prices IN EXCLUSIVE MODE")
    before = {
        r["model"]: _row_price(r) for r in await conn.fetch(_IN_EFFECT, [e.model for e in entries])
    }
    document = (
        "["
        + ", ".join(
            f'{{"model": {json.dumps(e.model)}, "prices": {e.as_json_text()}}}' for e in entries
        )
        + "]"
    )
    added: list[PriceChange] = []
    unchanged = 0
    for row in await conn.fetch(_SET_PRICES, document):
        duplicate, price = _answer_price(row[0], dry_run=dry_run)
        if duplicate:
            unchanged += 1
        else:
            added.append(PriceChange(before.get(price.model), price))
    return added, unchanged


class _RollBack(Exception):
    """Raised inside the transaction of a dry run, so that it is rolled back."""


async def import_prices(
    dsn: str,
    path: Path,
    *,
    provider: str | None = None,
    model: str | None = None,
    dry_run: bool = False,
) -> ImportResult:
    """Add the prices of LiteLLM's price map at ``path`` with ``set_model_price``, in one
    transaction (rolled back with ``dry_run``, which answers the same); only the schema owner
    may. ``provider`` and ``model`` filter as :func:`parse_litellm`."""
    try:
        parsed = read_litellm(path, provider=provider, model=model)
    except OSError as exc:
        raise OpsError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise OpsError(f"{path}: {exc}") from exc
    async with connected(dsn, "tokentrack prices") as conn:
        await require_installed(conn, table="model_prices")
        try:
            async with conn.transaction():
                added, unchanged = await _set_prices(conn, parsed.entries, dry_run=dry_run)
                if dry_run:
                    raise _RollBack
        except _RollBack:
            pass
        except asyncpg.InsufficientPrivilegeError as exc:
            role = await conn.fetchval("SELECT current_user")
            raise OpsError(
                f"{describe_target(dsn)}: {pg_error(exc)}: role {role} may not set prices: only "
                "the schema owner (the installer's role) may call tokentrack.set_model_price; "
                "nothing was written"
            ) from exc
    return ImportResult(
        file=str(path),
        dry_run=dry_run,
        added=tuple(added),
        unchanged=unchanged,
        skipped=parsed.skipped,
        filtered_out=parsed.filtered_out,
    )


async def list_prices(dsn: str, *, model: str | None = None) -> PriceList:
    """The prices in effect now for each model name or pattern, by name; ``model`` keeps the
    names that match that glob (:func:`glob_matches`: a pattern's own text is matched)."""
    async with connected(dsn, "tokentrack prices") as conn:
        await require_installed(conn, table="model_prices")
        rows = await conn.fetch(_IN_EFFECT, None)
    prices = sorted((_row_price(r) for r in rows), key=lambda p: p.model)  # not by collation
    if model is not None:
        prices = [p for p in prices if glob_matches(model, p.model)]
    return PriceList(tuple(prices))
