"""Bad input, table-driven: every argument of every public function, one at a time.

Each case calls one function with valid arguments except one, passed as text and cast in
SQL (``$n::text::integer``...), as a client that builds SQL from user input would: NULL,
zero, negative, beyond the integer range, empty, 10,000 characters, unicode, quote- and
semicolon-laden text, a NUL byte, and unknown or mismatched uuids. The expected outcome of
every case is written down:

``Err(sqlstate)``       a data exception (class 22); ``named``: raised by the function, whose
                        message and COLUMN name the argument (a failed cast happens before
                        the function runs and names no argument);
``Refused(code)``       ``"success": false`` with that code;
``Ok(changes)``         accepted (a legitimate value); ``changes`` are the exact row-count
                        changes per table.

Every table's row count is unchanged after an error or a refusal.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from sqlkit import call, counts, new_account, reserve, step
from tokentrack_client.testing import PostgresServer
from tokentrack_client.testing.pytest_plugin import TemplateDatabase
from workload import database_factory

A, B, R, RB = "<account A>", "<account B>", "<report R of A>", "<report RB of B>"
UNKNOWN, NEW = "<unknown uuid>", "<fresh uuid>"
ZERO_UUID = "00000000-0000-0000-0000-000000000000"
LONG = "x" * 10_000
UNICODE = "ünïcödé ✓ 名前 🚀"
EVIL = "'; DROP TABLE tokentrack.reports; --"
NUL = "a\x00b"


@dataclass(frozen=True)
class Err:
    sqlstate: str
    named: bool = True
    column: str | None = None  # the argument named, when not the one being varied


@dataclass(frozen=True)
class Refused:
    code: str


@dataclass(frozen=True)
class Ok:
    changes: tuple[tuple[str, int], ...] = ()


CAST = Err("22P02", named=False)  # invalid_text_representation, from the cast
OUT_OF_RANGE = Err("22003", named=False)  # numeric_value_out_of_range, from the cast
BAD_DATE = Err("22007", named=False)  # invalid_datetime_format, from the cast
NUL_BYTE = Err("22021", named=False)  # character_not_in_repertoire: text holds no NUL
NULL = Err("22004")
INVALID = Err("22023")
TOO_LONG = Err("22001")
SUM_OVERFLOWS = Err("22003", column="p_total_tokens")  # NULL total: input + output
UNCHANGED = Ok()
STEP_ADDED = Ok((("report_step_usage", 1),))
LEDGER_ROW = Ok((("usage_ledger", 1),))
PERIOD_ADDED = Ok((("usage_periods", 1),))

# function -> its arguments in order: (name, SQL type, valid value)
SIGNATURES: dict[str, list[tuple[str, str, str | None]]] = {
    "try_reserve_tokens": [
        ("p_account_id", "uuid", A),
        ("p_report_id", "uuid", R),  # R's reservation is active: answered as existing
        ("p_estimated_tokens", "integer", "10"),
    ],
    "persist_step_usage": [
        ("p_report_id", "uuid", R),
        ("p_account_id", "uuid", A),
        ("p_step_name", "text", "AN-new"),
        ("p_input_tokens", "integer", "1"),
        ("p_output_tokens", "integer", "1"),
        ("p_total_tokens", "integer", None),
        ("p_model", "text", None),
    ],
    "finalize_report_usage": [("p_report_id", "uuid", R), ("p_account_id", "uuid", A)],
    "finish_report": [
        ("p_report_id", "uuid", R),
        ("p_account_id", "uuid", A),
        ("p_status", "text", "failed"),
        ("p_error_message", "text", "boom"),
    ],
    "increment_usage": [
        ("p_account_id", "uuid", A),
        ("p_tokens", "integer", "5"),
        ("p_is_report", "boolean", "false"),
        ("p_is_chat", "boolean", "false"),
    ],
    "reconcile": [("p_account_id", "uuid", A)],
    "open_usage_period": [
        ("p_account_id", "uuid", A),
        ("p_tokens_limit", "bigint", "1000"),
        ("p_period_end", "timestamptz", None),
    ],
    "sweep_expired_reservations": [("p_batch_size", "integer", "10")],  # a procedure: CALL
}

BILLED = Ok((("usage_ledger", 1),))  # finalize/finish: one billing ledger row
BASELINE = {
    "try_reserve_tokens": UNCHANGED,
    "persist_step_usage": STEP_ADDED,
    "finalize_report_usage": BILLED,
    "finish_report": BILLED,
    "increment_usage": LEDGER_ROW,
    "reconcile": UNCHANGED,
    "open_usage_period": PERIOD_ADDED,
    "sweep_expired_reservations": UNCHANGED,
}

NOT_A_UUID = [
    ("empty", ""),
    ("zero", "0"),
    ("negative", "-1"),
    ("overflow", "99999999999999999999999999999999999999"),
    ("10k", LONG),
    ("unicode", UNICODE),
    ("quotes", EVIL),
    ("garbage", "not-a-uuid"),
]
NOT_AN_INTEGER = [
    ("empty", ""),
    ("decimal", "1.5"),
    ("unicode", UNICODE),
    ("quotes", "1; DROP TABLE tokentrack.reports; --"),
    ("10k-letters", LONG),
]
OVERFLOWS = [
    ("int-max+1", "2147483648"),
    ("int-min-1", "-2147483649"),
    ("20-digits", "99999999999999999999"),
    ("10k-digits", "9" * 10_000),
]


def uuid_cases(
    null: Any, unknown: Any, mismatch: tuple[str, Any] | None
) -> list[tuple[str, str | None, Any]]:
    cases: list[tuple[str, str | None, Any]] = [("null", None, null)]
    cases += [(label, value, CAST) for label, value in NOT_A_UUID]
    cases += [("unknown", UNKNOWN, unknown), ("nil-uuid", ZERO_UUID, unknown)]
    if mismatch is not None:
        cases.append(("mismatched", mismatch[0], mismatch[1]))
    return cases


def integer_cases(
    zero: Any, negative: Any, maximum: Any, null: Any = NULL
) -> list[tuple[str, str | None, Any]]:
    cases: list[tuple[str, str | None, Any]] = [
        ("null", None, null),
        ("zero", "0", zero),
        ("negative", "-1", negative),
        ("int-max", "2147483647", maximum),
    ]
    cases += [(label, value, OUT_OF_RANGE) for label, value in OVERFLOWS]
    cases += [(label, value, CAST) for label, value in NOT_AN_INTEGER]
    return cases


def text_cases(**outcomes: Any) -> list[tuple[str, str | None, Any]]:
    values = {
        "null": None,
        "empty": "",
        "blank": "   ",
        "200": "y" * 200,
        "201": "y" * 201,
        "10k": LONG,
        "unicode": UNICODE,
        "quotes": EVIL,
        "nul-byte": NUL,
    }
    values.update({k: v for k, v in EXTRA_TEXT.items() if k in outcomes})
    return [(label, values[label], outcome) for label, outcome in outcomes.items()]


EXTRA_TEXT = {"10001": "e" * 10_001, "existing-step": "AN0", "upper": "COMPLETE"}
BOOLEAN_CASES: list[tuple[str, str | None, Any]] = [
    ("null", None, NULL),
    ("yes", "yes", LEDGER_ROW),
    ("empty", "", CAST),
    ("maybe", "maybe", CAST),
    ("two", "2", CAST),
    ("unicode", UNICODE, CAST),
    ("quotes", "true; --", CAST),
    ("10k", LONG, CAST),
]

MATRIX: dict[tuple[str, str], list[tuple[str, str | None, Any]]] = {
    ("try_reserve_tokens", "p_account_id"): uuid_cases(
        NULL, Refused("account_not_found"), (B, Refused("report_account_mismatch"))
    ),
    ("try_reserve_tokens", "p_report_id"): uuid_cases(
        NULL,
        Ok((("reports", 1), ("report_reservations", 1))),  # a new report: reserved
        (RB, Refused("report_account_mismatch")),
    ),
    ("try_reserve_tokens", "p_estimated_tokens"): integer_cases(INVALID, INVALID, UNCHANGED),
    ("persist_step_usage", "p_report_id"): uuid_cases(
        NULL, Refused("reservation_not_found"), (RB, Refused("report_account_mismatch"))
    ),
    ("persist_step_usage", "p_account_id"): uuid_cases(
        NULL, Refused("report_account_mismatch"), (B, Refused("report_account_mismatch"))
    ),
    ("persist_step_usage", "p_step_name"): text_cases(
        null=NULL,
        empty=INVALID,
        blank=INVALID,
        **{"200": STEP_ADDED, "201": TOO_LONG, "10k": TOO_LONG},
        unicode=STEP_ADDED,
        quotes=STEP_ADDED,
        **{"nul-byte": NUL_BYTE, "existing-step": Refused("step_conflict")},
    ),
    ("persist_step_usage", "p_input_tokens"): integer_cases(
        STEP_ADDED,
        INVALID,
        SUM_OVERFLOWS,  # int-max + 1 output: the sum overflows
    ),
    ("persist_step_usage", "p_output_tokens"): integer_cases(STEP_ADDED, INVALID, SUM_OVERFLOWS),
    ("persist_step_usage", "p_total_tokens"): integer_cases(
        INVALID,
        INVALID,
        STEP_ADDED,
        null=STEP_ADDED,  # 0 and -1 are below input + output
    ),
    ("persist_step_usage", "p_model"): text_cases(
        null=STEP_ADDED,
        empty=STEP_ADDED,
        **{"200": STEP_ADDED, "201": TOO_LONG, "10k": TOO_LONG},
        unicode=STEP_ADDED,
        quotes=STEP_ADDED,
        **{"nul-byte": NUL_BYTE},
    ),
    ("finalize_report_usage", "p_report_id"): uuid_cases(
        NULL, Refused("reservation_not_found"), (RB, Refused("report_account_mismatch"))
    ),
    ("finalize_report_usage", "p_account_id"): uuid_cases(
        NULL, Refused("report_account_mismatch"), (B, Refused("report_account_mismatch"))
    ),
    ("finish_report", "p_report_id"): uuid_cases(
        NULL, Refused("reservation_not_found"), (RB, Refused("report_account_mismatch"))
    ),
    ("finish_report", "p_account_id"): uuid_cases(
        NULL, Refused("report_account_mismatch"), (B, Refused("report_account_mismatch"))
    ),
    ("finish_report", "p_status"): text_cases(
        null=NULL,
        empty=INVALID,
        blank=INVALID,
        **{"10k": INVALID},
        unicode=INVALID,
        quotes=INVALID,
        upper=INVALID,
        **{"nul-byte": NUL_BYTE},
    ),
    ("finish_report", "p_error_message"): text_cases(
        null=BILLED,
        empty=BILLED,
        **{"10k": BILLED, "10001": TOO_LONG},
        unicode=BILLED,
        quotes=BILLED,
        **{"nul-byte": NUL_BYTE},
    ),
    ("increment_usage", "p_account_id"): uuid_cases(
        NULL,
        Refused("account_not_found"),
        (B, LEDGER_ROW),  # another account's own usage
    ),
    ("increment_usage", "p_tokens"): integer_cases(LEDGER_ROW, INVALID, LEDGER_ROW),
    ("increment_usage", "p_is_report"): BOOLEAN_CASES,
    ("increment_usage", "p_is_chat"): BOOLEAN_CASES,
    ("reconcile", "p_account_id"): uuid_cases(
        UNCHANGED,
        Refused("account_not_found"),
        (B, UNCHANGED),  # NULL: every account
    ),
    ("open_usage_period", "p_account_id"): uuid_cases(
        NULL,
        Ok((("accounts", 1), ("usage_periods", 1))),  # opening a period creates the account
        (B, PERIOD_ADDED),
    ),
    ("open_usage_period", "p_tokens_limit"): [
        ("null", None, NULL),
        ("zero", "0", PERIOD_ADDED),
        ("negative", "-1", INVALID),
        ("bigint-max", "9223372036854775807", PERIOD_ADDED),
        ("bigint-max+1", "9223372036854775808", OUT_OF_RANGE),
        ("10k-digits", "9" * 10_000, OUT_OF_RANGE),
        *[(label, value, CAST) for label, value in NOT_AN_INTEGER if label != "decimal"],
    ],
    ("open_usage_period", "p_period_end"): [
        ("null", None, PERIOD_ADDED),
        ("infinity", "infinity", PERIOD_ADDED),
        ("next-century", "2100-01-01 00:00:00+00", PERIOD_ADDED),
        ("yesterday", "yesterday", INVALID),
        ("minus-infinity", "-infinity", INVALID),
        ("empty", "", BAD_DATE),
        ("unicode", UNICODE, BAD_DATE),
        ("quotes", EVIL, BAD_DATE),
        ("10k", LONG, BAD_DATE),
    ],
    ("sweep_expired_reservations", "p_batch_size"): integer_cases(INVALID, INVALID, UNCHANGED),
}

CASES = [
    (function, argument, label, value, outcome)
    for (function, argument), cases in MATRIX.items()
    for label, value, outcome in cases
]


def test_every_argument_of_every_function_is_covered() -> None:
    assert {(f, a) for f, args in SIGNATURES.items() for a, _, _ in args} == set(MATRIX)


async def world(conn: asyncpg.Connection) -> dict[str, str]:
    """Accounts A and B, each with a reserved report; R has a step AN0 (2 + 3 tokens)."""
    account_a = await new_account(conn, 1_000)
    account_b = await new_account(conn, 1_000)
    report_r, answer = await reserve(conn, account_a, 10)
    assert answer["success"] is True
    report_rb, answer = await reserve(conn, account_b, 10)
    assert answer["success"] is True
    assert (await step(conn, report_r, account_a, "AN0", 2, 3))["success"] is True
    return {
        A: str(account_a),
        B: str(account_b),
        R: str(report_r),
        RB: str(report_rb),
        UNKNOWN: str(uuid.uuid4()),
        NEW: str(uuid.uuid4()),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setting(
    pg_server: PostgresServer, tokentrack_template: TemplateDatabase
) -> AsyncIterator[tuple[asyncpg.Connection, dict[str, str]]]:
    """One database for the module: every case runs in a transaction that is rolled back."""
    factory = database_factory(pg_server, tokentrack_template.template_dbname)
    async with factory() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn, await world(conn)
        finally:
            await conn.close()


def statement(function: str, signature: list[tuple[str, str, str | None]]) -> str:
    casts = ", ".join(f"${n}::text::{sql_type}" for n, (_, sql_type, _) in enumerate(signature, 1))
    if function == "sweep_expired_reservations":
        return f"CALL tokentrack.{function}({casts})"  # commits: cannot run in a transaction
    return f"SELECT tokentrack.{function}({casts})::text"


def applied(before: dict[str, int], changes: tuple[tuple[str, int], ...]) -> dict[str, int]:
    expected = dict(before)
    for table, delta in changes:
        expected[table] += delta
    return expected


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("function", "argument", "label", "value", "outcome"),
    CASES,
    ids=[f"{f}-{a}-{label}" for f, a, label, _, _ in CASES],
)
async def test_bad_input_is_a_data_exception_or_a_refusal_and_writes_nothing(
    setting: tuple[asyncpg.Connection, dict[str, str]],
    function: str,
    argument: str,
    label: str,
    value: Any,
    outcome: Any,
) -> None:
    conn, ids = setting
    signature = SIGNATURES[function]
    args = [
        ids.get(value if name == argument else valid, value if name == argument else valid)
        for name, _, valid in signature
    ]
    sql = statement(function, signature)
    in_transaction = function != "sweep_expired_reservations"
    before = await counts(conn)
    transaction = conn.transaction()
    if in_transaction:
        await transaction.start()
    try:
        if isinstance(outcome, Err):
            with pytest.raises(asyncpg.PostgresError) as caught:
                await conn.fetchval(sql, *args)
            error = caught.value
            assert error.sqlstate == outcome.sqlstate, error.message
            assert error.sqlstate.startswith("22")
            if outcome.named:
                named = outcome.column or argument
                assert named in error.message
                assert error.column_name == named
            return
        raw = await conn.fetchval(sql, *args)
        answer = json.loads(raw) if raw is not None else {"success": True}
        during = await counts(conn)  # what the call wrote, before the rollback
        if isinstance(outcome, Refused):
            assert (answer["success"], answer["error"]) == (False, outcome.code)
            assert during == before
            return
        assert answer.get("success") is True, answer
        if function == "reconcile":
            assert answer["ok"] is True
        assert during == applied(before, outcome.changes)
    finally:
        if in_transaction:
            await transaction.rollback()
        assert await counts(conn) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_the_baseline_calls_are_valid(
    setting: tuple[asyncpg.Connection, dict[str, str]],
) -> None:
    """Each function with its valid arguments does what the table assumes."""
    conn, ids = setting
    for function, signature in SIGNATURES.items():
        args = [ids.get(valid, valid) if valid is not None else None for _, _, valid in signature]
        before = await counts(conn)
        if function == "sweep_expired_reservations":
            await conn.execute(statement(function, signature), *args)
            assert await counts(conn) == before
            continue
        transaction = conn.transaction()
        await transaction.start()
        try:
            raw = await conn.fetchval(statement(function, signature), *args)
            assert json.loads(raw)["success"] is True, (function, raw)
            assert await counts(conn) == applied(before, BASELINE[function].changes), function
        finally:
            await transaction.rollback()


@pytest.mark.asyncio(loop_scope="module")
async def test_cleanup_expired_reservations_takes_no_argument(
    setting: tuple[asyncpg.Connection, dict[str, str]],
) -> None:
    conn, _ = setting
    before = await counts(conn)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await conn.fetchval(
            "SELECT tokentrack.cleanup_expired_reservations($1::text::integer)", "1"
        )
    assert caught.value.sqlstate == "42883"  # undefined_function: there is no such overload
    answer = await call(conn, "cleanup_expired_reservations")
    assert (answer["success"], answer["expired"]) == (True, 0)
    assert await counts(conn) == before
