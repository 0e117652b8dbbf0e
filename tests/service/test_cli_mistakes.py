"""Every ``nbo`` command, given the mistakes people make: a missing or malformed file, a
bad date, too little data, an unknown product, version or key, an output that cannot be
written, a bad option. Each ends in a line or two saying what is wrong, a non-zero exit
status (2 for usage errors) and no traceback, which only ``--debug`` shows. And the help
of every command shows its docstring as written, at 80 and 120 columns."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
from sqlalchemy.exc import OperationalError

from service.cli import errors
from service.cli.context import UserError
from service.cli.main import app, reflowed
from tests.service.cli_bank import CliBank, make_cli_bank, run, runner

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Places:
    """Where the mistakes point: files and folders made once for the module."""

    root: Path
    empty_url: str
    bank: CliBank


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Places:
    root = tmp_path_factory.mktemp("mistakes")
    (root / "a-folder").mkdir()
    (root / "a-file.txt").write_text("not a folder\n")
    (root / "malformed.csv").write_text('a,b\n1,2,3\n"never closed\n')
    (root / "bad-dates-adoptions.csv").write_text(
        "customer_id,product_code,adopted_at\nC1,current_account,2024-13-45\n"
    )
    (root / "bad-dates-customers.csv").write_text("customer_id,joined_at\nC1,2024-02-30\n")
    (root / "baskets.csv").write_text("basket,thing\n1,milk\n")
    empty = root / "empty.sqlite3"
    shutil.copy(sqlite_template, empty)
    bank_root = root / "bank"
    bank_root.mkdir()
    return Places(root, f"sqlite:///{empty}", make_cli_bank(bank_root, sqlite_template))


@dataclass(frozen=True)
class Mistake:
    args: tuple[str, ...]
    code: int
    says: str
    """Words the message must hold (case-insensitive)."""
    trained: bool = False
    """Run on the bank with model versions (else on an empty database)."""


def m(*args: str, code: int = 2, says: str, trained: bool = False) -> Mistake:
    return Mistake(args, code, says, trained)


# {root} is the module's folder of files (see ``places``).
MISTAKES: list[Mistake] = [
    # import: missing, malformed, bad dates, not a bank folder
    m("import", "products", "{root}/missing.csv", says="does not exist"),
    m("import", "products", "{root}/malformed.csv", code=1, says="not a readable CSV"),
    m("import", "products", "{root}/a-folder", says="is a directory"),
    m("import", "customers", "{root}/missing.csv", says="does not exist"),
    m("import", "customers", "{root}/malformed.csv", code=1, says="not a readable CSV"),
    m("import", "customers", "{root}/bad-dates-customers.csv", code=1, says="date"),
    m("import", "adoptions", "{root}/missing.csv", says="does not exist"),
    m("import", "adoptions", "{root}/bad-dates-adoptions.csv", code=1, says="unparsable date"),
    m("import", "snapshots", "{root}/missing.csv", "--products", "x", says="does not exist"),
    m("import", "snapshots", "{root}/a-file.txt", "--products", "x", "--map", "x", says="COLUMN="),
    m("import", "bank", "{root}/missing", says="does not exist"),
    m("import", "bank", "{root}/a-folder", says="no products.csv"),
    # train and evaluate: bad options, too little data, unknown --truth, unwritable report
    m("train", says="nothing to learn from", code=1),
    m("train", "--as-of", "2024-02-30", says="is not a date"),
    m("train", "--horizon-days", "3", says="--horizon-days"),
    m("train", "--truth", "{root}/missing", says="does not exist"),
    m("train", "--truth", "{root}/a-folder", says="not a synthetic bank folder"),
    m("train", "--report", "{root}/a-folder", says="is a folder, not a file"),
    m("train", "--report", "{root}/a-file.txt/report.html", says="is a file"),
    m("train", "--forced-sales", "maybe", says="keep or drop"),
    m("evaluate", "--report", "{root}/r.html", says="nothing to learn from", code=1),
    m("evaluate", "--as-of", "01/02/2024", says="is not a date"),
    m("evaluate", "--truth", "{root}/a-folder", says="not a synthetic bank folder"),
    m("evaluate", "--bank", "{root}/missing", says="does not exist"),
    m("evaluate", "--report", "{root}/a-folder", says="is a folder, not a file"),
    # score: no model, unknown product and version, unwritable output, bad options
    m("score", "--out", "{root}/s.csv", says="no active model version", code=1),
    m("score", "--out", "{root}/s.csv", "--product", "yacht", says="does not score", trained=True),
    m("score", "--out", "{root}/s.csv", "--version", "v9", says="no model version", trained=True),
    m("score", "--out", "{root}/a-folder", says="is a folder, not a file", trained=True),
    m("score", "--out", "{root}/a-file.txt/s.csv", says="is a file", trained=True),
    m("score", "--out", "{root}/s.txt", says="must end in .csv", trained=True),
    m("score", "--out", "{root}/s.csv", "--rank-by", "value", says="'expected-value'"),
    m("score", "--out", "{root}/s.csv", "--as-of", "tomorrow", says="is not a date"),
    m("score", "--out", "{root}/s.csv", "--top-k", "0", says="--top-k"),
    m("score", says="--out"),
    # the registry
    m("models", "list", "--all", says="No such option"),
    m("models", "show", "v9", says="no model version 'v9'", trained=True),
    m("models", "promote", "v9", says="no model version 'v9'", trained=True),
    m("models", "rollback", says="no active version", code=1),
    m("models", "prepare", "--version", "v9", says="no model version"),
    m("export", "{root}/out", "--format", "csv", says="writes parquet"),
    m("export", "{root}/a-file.txt", says="is a file"),
    m("rules", "--version", "v9", says="no model version 'v9'", trained=True),
    m("rules", "--consequent", "yacht", says="unknown product(s) yacht", trained=True),
    m("rules", "--min-confidence", "2", says="--min-confidence"),
    m("rules", "--csv", "{root}/a-folder", says="is a folder, not a file", trained=True),
    m("rules", "mine", "{root}/missing.csv", says="does not exist"),
    m("rules", "mine", "{root}/baskets.csv", says="transaction_id", code=1),
    m("rules", "mine", "{root}/baskets.csv", "--out", "{root}/a-folder", says="is a folder"),
    # keys
    m("keys", "revoke", "nbo_nope", says="no API key with prefix"),
    m("keys", "create", "--name", "x", says="either --scopes or --role"),
    m("keys", "create", "--name", "x", "--role", "king", says="king"),
    m("keys", "list", "--secret", says="No such option"),
    # reports
    m("report", "conversion", "--start", "x", "--end", "2024-01-01", says="is not a date"),
    m(
        "report",
        "conversion",
        "--start",
        "2024-01-01",
        "--end",
        "2024-01-02",
        "--by",
        "planet",
        says="planet",
    ),
    m(
        "report",
        "conversion",
        "--start",
        "2024-01-01",
        "--end",
        "2024-01-02",
        "--csv",
        "{root}/a-folder",
        says="is a folder, not a file",
    ),
    m(
        "report",
        "uplift",
        "--start",
        "2024-01-01",
        "--end",
        "2024-01-02",
        "--confidence",
        "1.5",
        says="not between 0 and 1",
    ),
    m("report", "nps", "--start", "2024-02-01", "--end", "2024-01-01", says="before --start"),
    m("report", "csat", "--start", "2024-01-01", says="--end"),
    m("report", "staff", "S1", "--day", "2024-13-01", says="is not a date"),
    m("report", "branch", "B1", "--day", "yesterday", says="is not a date"),
    # the rest
    m("generate", "--customers", "0", says="--customers"),
    m("generate", "--start", "first of may", says="is not a date"),
    m("generate", "--start", "2025-01-01", "--end", "2024-01-01", says="is not after --start"),
    m("generate", "--format", "xml", says="csv or parquet"),
    m("generate", "--out", "{root}/a-file.txt", says="is a file, not a folder"),
    m("generate", "--offers-per-month", "2", says="--offers-per-month"),
    m("demo", "--customers", "5", says="--customers"),
    m("serve", "--port", "http", says="--port"),
    m("serve", "--port", "70000", says="--port"),
    m("serve", "--workers", "0", says="--workers"),
    m("openapi", "--out", "{root}/a-folder", says="is a folder, not a file"),
    m("db", "upgrade", "nonsense", says="nonsense"),
    m("db", "downgrade", "nonsense", says="nonsense"),
    m("db", "current", "extra", says="unexpected extra argument"),
    m("simulate", "--days", "0", says="--days"),
    m("simulate", "--control-share", "2", says="--control-share"),
    m("frobnicate", says="No such command"),
]


def _filled(args: tuple[str, ...], root: Path) -> list[str]:
    return [a.replace("{root}", str(root)) for a in args]


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda x: " ".join(x.args)[:70])
def test_a_mistake_is_said_in_a_line_or_two(mistake: Mistake, places: Places) -> None:
    url = places.bank.url if mistake.trained else places.empty_url
    code, output = run(_filled(mistake.args, places.root), url, places.root)
    assert code == mistake.code, output
    assert "Traceback" not in output, output
    assert mistake.says.lower() in " ".join(output.split()).lower(), output


def _commands() -> Iterator[tuple[str, ...]]:
    """Every command `nbo --help` leads to, as the words that invoke it."""

    def walk(command: object, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        children = getattr(command, "commands", None)
        if not children or getattr(command, "invoke_without_command", False):
            yield path
        for name, child in (children or {}).items():
            yield from walk(child, (*path, name))

    yield from walk(typer.main.get_command(app), ())


def test_the_mistakes_reach_every_command() -> None:
    covered = {mistake.args for mistake in MISTAKES}
    commands = [c for c in _commands() if c]
    missing = [
        " ".join(command)
        for command in commands
        # `nbo rules` is reached by its options; `nbo rules mine` by its own word.
        if not any(
            args[: len(command)] == command
            and not (command == ("rules",) and args[1:2] == ("mine",))
            for args in covered
        )
    ]
    assert len(commands) > 25
    assert missing == []


def test_an_unexpected_error_is_one_line_and_debug_shows_it(
    places: Places, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("the disk ate it")

    monkeypatch.setattr("service.cli.models.open_session", broken)
    code, output = run(["models", "list"], places.empty_url, places.root)
    assert code == 1
    assert "unexpected error: RuntimeError: the disk ate it" in output
    assert "--debug" in output and "Traceback" not in output
    result = runner.invoke(
        app, ["--debug", "models", "list"], env={"NBO_DATABASE_URL": places.empty_url}
    )
    assert isinstance(result.exception, RuntimeError)  # raised on, for the traceback


@pytest.mark.parametrize(
    ("error", "code", "says"),
    [
        (FileNotFoundError(2, "No such file or directory", "/x/y.csv"), 2, "/x/y.csv: no such"),
        (IsADirectoryError(21, "Is a directory", "/x"), 2, "/x: is a folder"),
        (NotADirectoryError(20, "Not a directory", "/f/x"), 2, "part of this path is a file"),
        (PermissionError(13, "Permission denied", "/root/r.html"), 2, "permission denied"),
        (ValueError("not enough history: the first adoption is ..."), 1, "not enough history"),
        (ModuleNotFoundError("No module named 'lightgbm'"), 1, "cannot be loaded"),
        (OperationalError("SELECT 1", {}, Exception("no such table: customers")), 1, "db upgrade"),
        (UserError("--out x: is a folder", hint="give a file path"), 2, "give a file path"),
        (KeyError("product"), 1, "this is a bug in nbo"),
    ],
)
def test_errors_are_explained_by_type(error: Exception, code: int, says: str) -> None:
    status, lines = errors.explain(error)
    assert status == code
    assert 1 <= len(lines) <= 2
    assert says in " ".join(lines)


def _nbo_process(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "NBO_DATA_DIR": str(tmp_path),
        "NBO_DATABASE_URL": "",
        "NBO_DEBUG": "",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=120,
        check=False,
    )


def test_a_real_process_shows_a_traceback_only_with_debug(tmp_path: Path) -> None:
    mistake = ["generate", "--start", "2025-01-01", "--end", "2024-01-01", "--out", "x"]
    plain = _nbo_process(mistake, tmp_path)
    assert plain.returncode == 2
    assert (
        plain.stderr.strip().splitlines()[0] == "--end 2024-01-01 is not after --start 2025-01-01"
    )
    assert "Traceback" not in plain.stdout + plain.stderr
    for debug in (
        _nbo_process(["--debug", *mistake], tmp_path),
        _nbo_process(mistake, tmp_path, NBO_DEBUG="1"),
    ):
        assert debug.returncode != 0
        assert "Traceback (most recent call last)" in debug.stderr
        assert "is not after --start" in debug.stderr


# ---------------------------------------------------------------- help


def _help_paragraphs(path: tuple[str, ...]) -> list[str]:
    """The paragraphs of the help Typer gives Click for ``path``, from the docstring."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    text = inspect.cleandoc(command.help or "")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _early_breaks(lines: list[str], width: int) -> list[tuple[str, str]]:
    """Pairs of lines of one paragraph where the first ends although the next word fitted:
    a line break of the docstring's, not of the terminal."""
    found = []
    for line, following in zip(lines, lines[1:], strict=False):
        if line.strip() and following.strip():
            room = len(line.rstrip()) + 1 + len(following.split()[0])
            if room <= width - 3:
                found.append((line.rstrip(), following.strip()))
    return found


@pytest.mark.parametrize("columns", [80, 120])
def test_help_renders_each_docstring_paragraph_whole(columns: int) -> None:
    checked = 0
    for path in _commands():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
        assert result.exit_code == 0, (path, result.output)
        lines = result.output.splitlines()
        # The prose: after the usage line, before the first panel.
        start = next(i for i, line in enumerate(lines) if "Usage:" in line) + 1
        end = next((i for i, line in enumerate(lines) if line.startswith("╭")), len(lines))
        prose = lines[start:end]
        text = " ".join(" ".join(prose).split())
        for paragraph in _help_paragraphs(path):
            assert paragraph in text, (path, columns, paragraph, text)
            checked += 1
        assert _early_breaks(prose, columns) == [], (path, columns)
        assert max(len(line) for line in lines) <= columns, (path, columns)
    assert checked > 30


def test_reflowed_joins_lines_within_paragraphs_only() -> None:
    text = """First line
    goes on.

    Second paragraph,
      indented oddly.

    \b
    kept
      as is"""
    assert (
        reflowed(text)
        == "First line goes on.\n\nSecond paragraph, indented oddly.\n\n\b\nkept\n  as is"
    )


def test_the_early_break_check_finds_the_old_bug() -> None:
    """``nbo train --help`` as Typer rendered it before: the check must catch it."""
    old = [
        " The new version is compared with the active one on the same holdout. Recorded  ",
        " offer                                                                          ",
        " outcomes are learnt from: a recent decline of a product is a feature, and      ",
        " accepted                                                                       ",
        " offers are positives (unless --forced-sales drop).                             ",
    ]
    assert [first for first, _ in _early_breaks(old, 80)] == [" offer", " accepted"]
    assert re.search(r"\boffer outcomes\b", " ".join(" ".join(old).split()))


def test_only_too_little_data_gets_the_advice_to_import_more(
    places: Places, tmp_path: Path
) -> None:
    """`nbo train --truth` on a bank folder with a customer written twice: the error
    names the folder and the id, with no advice about history or dates, which would
    send the user to the wrong place; too little data still gets it."""
    twice = tmp_path / "twice"
    shutil.copytree(places.bank.bank, twice)
    lines = (twice / "customers.csv").read_text().splitlines()
    (twice / "customers.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    code, output = run(["train", "--truth", str(twice)], places.bank.url, places.root)
    said = " ".join(output.split())
    assert code == 1, output
    assert f"the synthetic bank in {twice}: id" in said and "appears more than once" in said
    assert "import more history" not in said and "Traceback" not in said
    code, output = run(["train", "--as-of", "2001-01-01"], places.bank.url, places.root)
    said = " ".join(output.split())
    assert code == 1 and "nothing to learn:" in said and "import more history" in said, output
