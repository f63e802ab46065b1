"""Every option, argument and trainer setting is documented in the repository (docs/options.md and the
docstrings' Args blocks), read from the code's own tables: an option, argument or setting added later
fails here until it is documented. No document sends a reader to files outside the repository."""
import ast
import dataclasses
import inspect
import os
import re

import pytest

from gro_kernels import GROLoss, gro_loss, gro_objective, token_logprobs
from gro_kernels.objective.options import DEFAULTS, METHODS, OPTIONS, PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS_MD = open(os.path.join(ROOT, "docs", "options.md")).read()
FUNCTIONS = {"gro_loss": gro_loss, "GROLoss.forward": GROLoss.forward, "gro_objective": gro_objective,
             "token_logprobs": token_logprobs}


def section(title, level="##"):
    """The text of docs/options.md's section `title`, up to the next heading of the same level."""
    head = f"\n{level} {title}\n"
    start = OPTIONS_MD.index(head) + len(head)
    end = re.search(rf"^{level} ", OPTIONS_MD[start:], re.M)
    return OPTIONS_MD[start:start + end.start()] if end else OPTIONS_MD[start:]


def first_column(text):
    """The names in the first column of the Markdown tables of `text`: | `name` | ..."""
    return set(re.findall(r"^\| `([\w/]+)` \|", text, re.M))


def args_entries(doc):
    """The names of a docstring's Args block (Google style: `name: ...` one level in)."""
    block = re.search(r"^( *)Args:\n(.*?)(?=^\1\S|\Z)", doc, re.M | re.S)
    assert block, "no Args block"
    indent = block.group(1) + "    "
    return set(re.findall(rf"^{indent}(\**\w+):", block.group(2), re.M))


def test_every_option_has_an_entry_and_every_entry_is_an_option():
    headings = re.findall(r"^#### (.+)$", section("The options"), re.M)
    documented = {name for h in headings for name in re.findall(r"`(\w+)`", h)}
    assert not set(OPTIONS) - documented, f"options without an entry in docs/options.md: {sorted(set(OPTIONS) - documented)}"
    assert not documented - set(OPTIONS), f"entries for names that are not options: {sorted(documented - set(OPTIONS))}"


def rendered(value):
    """How docs/options.md may write a default value."""
    if isinstance(value, str):
        return [f'`"{value}"`']
    if isinstance(value, float):
        return [f"`{value!r}`", f"`{value:g}`", "`" + format(value, ".0e").replace("e-0", "e-") + "`"]
    return [f"`{value!r}`"]


def test_every_entry_gives_the_default():
    """Each entry states its option's default value (DEFAULTS) in a sentence that says "default"."""
    entries = re.split(r"^#### ", section("The options"), flags=re.M)[1:]
    for entry in entries:
        names = re.findall(r"`(\w+)`", entry.splitlines()[0])
        sentences = [x for x in re.split(r"\.\s", " ".join(entry.splitlines()[1:])) if "efault" in x]
        for name in names:
            assert any(r in x for x in sentences for r in rendered(DEFAULTS[name])), \
                f"{name}: default {DEFAULTS[name]!r} not stated"


def test_defaults_by_method_table_is_the_preset_table():
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", section("Defaults by method"), re.M))
    assert set(rows) == set(METHODS), sorted(set(rows) ^ set(METHODS))
    for method in METHODS:
        stated = {k: ast.literal_eval(v) for k, v in re.findall(r"`(\w+)=([^`]+)`", rows[method])}
        want = {k: v for k, v in PRESETS[method].items() if v != DEFAULTS[k]}
        assert stated == want, method


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_argument_is_in_the_inputs_table_and_the_docstring(name):
    fn = FUNCTIONS[name]
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    table = first_column(section("Inputs"))
    entries = args_entries(inspect.getdoc(fn))
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            assert f"**{p.name}" in entries, f"{name}: **{p.name} not in the Args block"
            continue
        assert p.name in table or p.name in OPTIONS, f"{name}: {p.name} not in docs/options.md's Inputs table"
        assert p.name in entries, f"{name}: {p.name} not in the Args block"
    if name != "token_logprobs" and "GROLoss" not in name:  # **options: every option named
        doc = inspect.getdoc(fn)
        assert all(re.search(rf"\b{o}\b", doc) for o in OPTIONS), [o for o in OPTIONS if not re.search(rf"\b{o}\b", doc)]


def test_module_and_config_docstrings_list_their_arguments():
    from gro_kernels.trainer import GROConfig

    assert args_entries(inspect.getdoc(GROLoss)) == {"method", "**options"}
    assert "Args:" in inspect.getdoc(GROLoss.forward) and "torch" not in inspect.getdoc(GROLoss.forward)[:40]
    fields = {f.name for f in dataclasses.fields(GROConfig)}
    assert args_entries(inspect.getdoc(GROConfig)) == fields
    assert first_column(section("GROTrainer settings")) == fields


def test_help_of_gro_loss_lists_what_it_passes_on():
    doc = inspect.getdoc(gro_loss)
    assert "every other argument goes to" not in doc.lower()
    assert "**options" in args_entries(doc)


def test_no_document_points_outside_the_repository():
    """Users have the repository only: nothing may send them to the team's working notes."""
    offenders = []
    for base, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "build", "dist", "__pycache__")
                   and not d.endswith(".egg-info")]
        for f in files:
            if f.endswith((".py", ".md", ".sh", ".toml")) or f == "Makefile":
                path = os.path.join(base, f)
                if path == os.path.abspath(__file__):
                    continue
                text = open(path, encoding="utf-8").read()
                if re.search(r"GRO\.md|shared folder|/work/shared", text):
                    offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders
